"""Cold starts of the same handlers, on the same rootfs, by the tools a user
would otherwise pick: a plain chroot (the floor without a zygote), bwrap,
crun and runc.  Each sample is the wall time from spawning the tool until
it has exited and its output was read.

Run by run.py as
    unshare -m --propagation private python3 peers.py SPEC.json
and prints its samples as JSON.  The private mount namespace lets it bind
the handlers at ROOTFS/handler for chroot, and put a tmpfs over
/sys/fs/cgroup/unified: on a hybrid-cgroup host crun refuses to start
("cgroup v2 is mounted but has no controllers"), and with the cgroup2 tree
hidden it detects v1 and works.  runc is given the same view.
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from worker.cpu_latency import CpuLatency  # noqa: E402

EVENT = '{"name": "bench"}'


def mount(*args):
    subprocess.run(["mount", *args], check=True)


def oci_config(rootfs, handlers, args):
    """A minimal OCI runtime spec: read-only rootfs, own /proc, /dev, /tmp,
    the handlers at /handler, and pid/ipc/uts/mount/network namespaces."""
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "cwd": "/",
                    "noNewPrivileges": True},
        "root": {"path": rootfs, "readonly": True},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "size=65536k"]},
            {"destination": "/handler", "type": "bind", "source": handlers,
             "options": ["rbind", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount",
                                                        "network")]},
    }


def command(peer, rootfs, handlers, bundles, handler, serial):
    run = ["/usr/bin/python3", "/handler/runner.py", handler, EVENT]
    if peer == "chroot":
        return ["chroot", rootfs] + run
    if peer == "bwrap":
        return ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", rootfs, "/",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--ro-bind", handlers, "/handler"] + run
    bundle = os.path.join(bundles, handler)
    if not os.path.exists(os.path.join(bundle, "config.json")):
        os.makedirs(bundle, exist_ok=True)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(oci_config(rootfs, handlers, run), f)
    return [peer, "run", "--bundle", bundle, "olbench-%d-%d" % (os.getpid(), serial)]


def measure(cmd, latency):
    """Seconds from spawning `cmd` to its exit, with the same request that
    idle CPUs be quick to wake as a worker makes while it serves a call
    (`latency`, a CpuLatency, or None where the kernel has no such
    request): the comparison is of sandboxes, not of CPU idle states."""
    start = time.perf_counter()
    if latency is not None:
        latency.hold()
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        if latency is not None:
            latency.relax()
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or b"bench" not in done.stdout:
        raise RuntimeError("%s failed (%d): %s" % (cmd[0], done.returncode,
                                                  done.stderr.decode(errors="replace")[-300:]))
    return elapsed


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    rootfs, handlers = spec["rootfs"], spec["handlers"]
    mount("--bind", "-o", "ro", handlers, os.path.join(rootfs, "handler"))
    if os.path.ismount("/sys/fs/cgroup/unified"):
        mount("-t", "tmpfs", "tmpfs", "/sys/fs/cgroup/unified")
    bundles = spec["bundles"]
    latency = None
    if spec["cpu_wake_latency_us"] is not None:
        try:
            latency = CpuLatency(spec["cpu_wake_latency_us"])
        except OSError as e:
            print("  peers run with idle CPUs as the host has them: %s" % e.strerror,
                  file=sys.stderr, flush=True)
    results = []
    serial = 0
    for job in spec["jobs"]:  # {"peer", "handler", "scenario", "n", "gap"}
        if shutil.which(job["peer"]) is None:
            results.append(dict(job, error="%s is not installed" % job["peer"]))
            continue
        samples = []
        try:
            measure(command(job["peer"], rootfs, handlers, bundles, job["handler"], serial),
                    latency)
            for _ in range(job["n"]):
                serial += 1
                if job["gap"]:
                    time.sleep(job["gap"])
                samples.append(measure(command(job["peer"], rootfs, handlers, bundles,
                                               job["handler"], serial), latency))
        except RuntimeError as e:
            results.append(dict(job, error=str(e), samples=samples))
            continue
        results.append(dict(job, samples=samples))
        print("  %-6s %-5s %-8s n=%d done" % (job["peer"], job["handler"], job["scenario"],
                                             job["n"]), file=sys.stderr, flush=True)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
