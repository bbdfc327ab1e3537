"""Builds a zygote's sandbox root, then execs the rootfs's python3 in it.

Run by the worker (sandbox/zygote.py) with SPEC as its argument, through clone3 with new
mount, PID, IPC and UTS namespaces, so this process is already pid 1 of its
namespace; after the exec the zygote is.  SPEC is a JSON object with
"rootfs", "hostname" and "scratch_mb".
"""
import json
import os
import socket
import sys

from .runtime import mounts as m
from .runtime import proto
from .runtime.syscalls import SyscallError

RUNTIME_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")
# The harmless character devices every sandbox gets: (name, major, minor).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))
ZYGOTE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "PYTHONPATH": "/ol",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    # Every library symbol is bound when the zygote loads: else each child
    # binds those the zygote never called itself on their first call, each
    # time writing (and so copying) a page of the zygote's, some of them
    # while a call waits (~0.1 ms of a cold start after idle).
    "LD_BIND_NOW": "1",
}


def zygote_root_plan(rootfs, scratch_mb, runtime_dir=RUNTIME_DIR):
    """The mount tree of a zygote's sandbox, as data."""
    def at(path):
        return os.path.join(rootfs, path)

    plan = [
        m.MakePrivate(),
        # The root: the rootfs, bound read-only.
        m.Bind(rootfs, rootfs, readonly=True),
        # The runtime, read-only, importable as the package "olrt".
        m.Bind(runtime_dir, at("ol/olrt"), readonly=True),
        m.Proc(at("proc")),
        # A minimal /dev: a few harmless devices, its own ptys and shm, nothing
        # else (no disks, no /dev/mem, no kmsg).  The nodes are made, not
        # bound from the host: every mount here is copied into each sandbox
        # and torn down with it, so fewer mounts mean cheaper sandboxes.  The
        # tmpfs allows devices for that reason; it is made read-only below,
        # so no other node can ever be created in it.
        m.Tmpfs(at("dev"), 1, 0o755, nodev=False),
    ]
    plan += [m.DeviceNode(at("dev/" + name), major, minor) for name, major, minor in DEVICES]
    plan += [
        m.Mkdir(at("dev/pts"), 0o755),
        m.Devpts(at("dev/pts")),
        m.Symlink("pts/ptmx", at("dev/ptmx")),
        m.Mkdir(at("dev/shm"), 0o1777),
        m.Tmpfs(at("dev/shm"), scratch_mb, 0o1777),
        m.Symlink("/proc/self/fd", at("dev/fd")),
        m.Symlink("/proc/self/fd/0", at("dev/stdin")),
        m.Symlink("/proc/self/fd/1", at("dev/stdout")),
        m.Symlink("/proc/self/fd/2", at("dev/stderr")),
        m.RemountReadonly(at("dev"), nodev=False),  # its nodes must stay usable
        m.Tmpfs(at("tmp"), scratch_mb, 0o1777),
        m.PivotRoot(rootfs),
    ]
    return plan


def main():
    spec = json.loads(sys.argv[1])
    try:
        m.apply(zygote_root_plan(spec["rootfs"], spec["scratch_mb"]))
        socket.sethostname(spec["hostname"])
    except (SyscallError, OSError) as e:
        print("launch zygote in %s: %s" % (spec["rootfs"], e), file=sys.stderr)
        sys.exit(proto.EXIT_BOOT_SETUP)
    argv = ["python3", "-s", "-B", "-m", "olrt.zygote"]
    try:
        os.execve("/usr/bin/python3", argv, ZYGOTE_ENV)  # PYTHONPATH=/ol finds olrt
    except OSError as e:
        print("launch zygote: exec /usr/bin/python3 in %s: %s" % (spec["rootfs"], e.strerror),
              file=sys.stderr)
        sys.exit(proto.EXIT_BOOT_SETUP)


if __name__ == "__main__":
    main()
