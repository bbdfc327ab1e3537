#!/usr/bin/env python3
"""Cold-start microbenchmarks: our worker against the other ways of running
the same Python handlers on the same rootfs, all in one run.

    make bench                                       # everything, the peers installed
    make bench BENCH_ARGS=--quick                    # fewer samples, for a smoke test
    .venv/bin/python scripts/bench/run.py --soak 600 # also a soak

Ways measured, for the hello and heavy-stdlib handlers:
  chroot    a fresh python3 in the rootfs, no namespaces: the floor without a zygote
  fresh     our sandbox, but a fresh interpreter per sandbox (worker "zygote": false)
  zygote    our sandbox forked from the zygote (the default)
  hostnet   the same without its own network namespace (network_isolation false)
  egress    the same with egress (ol.yaml `egress: true`): a pooled namespace
            with a veth, an address and NAT (hello only)
  warm      a call on a live handler
  halting, warm-halting   zygote and warm with `cpu_wake_latency_us: null`:
            idle CPUs left to halt while calls come in (hello only)
  bwrap, crun, runc   the peers, each running the same handler on the same rootfs

Ours are measured end to end over HTTP from a client on this host; peers from
spawning the tool to its exit.  Results go to bench-results/<time>/:
results.json (raw samples and summary), summary.md (tables) and latency.png.
Needs root, `make`, and for the peers `make bench-deps`.
"""
import argparse
import atexit
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from worker.cluster import template_defaults  # noqa: E402
from worker.cpu_latency import LINGER  # noqa: E402
from client import Client, phases  # noqa: E402
import stalls  # noqa: E402
import report  # noqa: E402

ADMIN = os.path.join(REPO, "bin", "admin")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
ROOTFS = os.path.join(REPO, "build", "rootfs")
HANDLERS = os.path.join(HERE, "handlers")
EVENT = b'{"name": "bench"}'
PEERS = ("chroot", "bwrap", "crun", "runc")
SOAK_FUNCTIONS = 400  # distinct functions in the soak, half hello, half heavy
SOAK_LIVE = 64        # the soak worker's max_sandboxes: most cold starts evict


def step(i, total, text):
    print("[%d/%d] %s" % (i, total, text), flush=True)


def admin(*args):
    done = subprocess.run([ADMIN, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("bench: admin %s failed: %s" % (" ".join(map(str, args)),
                                                 done.stderr.strip() or done.stdout))
    return done.stdout


def settle(timeout=10.0, window=0.3, busy_below=0.1):
    """Wait until the CPUs are nearly idle (a worker that just started is
    still filling its pools, and an egress worker making namespaces), so
    that no scenario measures another's start-up."""
    def busy_and_total():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle, iowait
        return sum(ticks) - idle, sum(ticks)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0, total0 = busy_and_total()
        time.sleep(window)
        busy1, total1 = busy_and_total()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            return


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A worker of our own with `count` copies of each bench handler, so that
    every cold start has a function that was never called before."""

    def __init__(self, base, name, count, egress=False, **settings):
        self.path = os.path.join(base, name)
        admin("new", "-cluster", self.path)
        if egress:
            settings["egress"] = {"enabled": True, "spare": 8}
        # A run is longer than idle_sec: a handler kept for its warm calls
        # must not expire while the peers are measured.
        settings.setdefault("idle_sec", None)
        admin("setconf", "-cluster", self.path, json.dumps(settings))
        for handler in ("hello", "heavy"):
            src = os.path.join(HANDLERS, handler)
            for i in range(count):
                dst = os.path.join(self.path, "registry", "%s-%d" % (handler, i))
                shutil.copytree(src, dst)
                if egress:
                    with open(os.path.join(dst, "ol.yaml"), "w") as f:
                        f.write("egress: true\n")
        self.port = free_port()
        admin("workers", "-cluster", self.path, "-p", self.port)
        self.next = {"hello": 0, "heavy": 0}

    def fresh_name(self, handler):
        """A function of this handler not called yet."""
        self.next[handler] += 1
        return "%s-%d" % (handler, self.next[handler] - 1)

    def worker_pid(self):
        with open(os.path.join(self.path, "workers", str(self.port), "pid")) as f:
            return int(f.read())

    def sandboxes(self):
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/sandboxes" % self.port) as r:
            return json.load(r)

    def restart(self):
        """A fresh worker, so that a scenario does not inherit the hundreds
        of idle sandboxes the ones before it left (the bench sets
        max_sandboxes high, so nothing is evicted)."""
        self.kill()
        admin("workers", "-cluster", self.path, "-p", self.port)
        settle()

    def kill(self):
        subprocess.run([ADMIN, "kill", "-cluster", self.path], capture_output=True)


def call(client, name):
    status, headers, body, seconds = client.post("/run/" + name, EVENT)
    if status != 200:
        raise RuntimeError("%s answered %d: %s" % (name, status, body[:200]))
    return seconds, phases(headers)


def after_requests_lapse():
    """Until the other workers' requests that idle CPUs be quick to wake
    have lapsed (each withdraws its own LINGER after its last call): the
    halting ways must measure halting CPUs."""
    time.sleep(2 * LINGER)


def run_sequential(cluster, handler, n, gap, warm=False):
    client = Client(cluster.port)
    samples, timings = [], []
    name = cluster.fresh_name(handler) if warm else None
    if warm:
        call(client, name)
    for _ in range(n):
        if gap:
            time.sleep(gap)
        seconds, timing = call(client, name or cluster.fresh_name(handler))
        samples.append(seconds)
        timings.append(timing)
    client.close()
    return samples, timings


def run_concurrent(cluster, handler, n, concurrency):
    names = [cluster.fresh_name(handler) for _ in range(n)]
    errors = []

    def worker(part):
        client = Client(cluster.port)
        out = []
        for name in part:
            try:
                out.append(call(client, name)[0])
            except (RuntimeError, OSError) as e:
                errors.append(str(e))
                client.close()
        client.close()
        return out

    parts = [names[i::concurrency] for i in range(concurrency)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        samples = [s for part in pool.map(worker, parts) for s in part]
    return samples, errors


def run_peers(jobs, tmp):
    spec = {"rootfs": ROOTFS, "handlers": HANDLERS, "bundles": os.path.join(tmp, "bundles"),
            "jobs": jobs,
            # What the zygote cluster's worker asks for while it serves calls.
            "cpu_wake_latency_us": template_defaults()["cpu_wake_latency_us"]}
    path = os.path.join(tmp, "peers.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    done = subprocess.run(["unshare", "-m", "--propagation", "private", PYTHON,
                           os.path.join(HERE, "peers.py"), path],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit("bench: the peer driver failed (status %d)" % done.returncode)
    return json.loads(done.stdout)


def run_wrk(cluster, seconds, connections):
    if shutil.which("wrk") is None:
        return {"error": "wrk is not installed (make bench-deps)"}
    name = cluster.fresh_name("hello")
    call(Client(cluster.port), name)
    script = os.path.join(HERE, "post.lua")
    done = subprocess.run(["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds, "-s", script,
                           "http://127.0.0.1:%d/run/%s" % (cluster.port, name)],
                          capture_output=True, text=True)
    out = done.stdout
    result = {"connections": connections, "seconds": seconds, "output": out}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            result["requests_per_s"] = float(words[1])
        elif "requests in" in line:
            result["requests"] = int(words[0])
        elif line.strip().startswith("Non-2xx"):
            result["non_2xx"] = int(words[-1])
        elif line.strip().startswith("Socket errors"):
            result["socket_errors"] = sum(int(w.strip(",")) for w in words[3::2])
    result.setdefault("non_2xx", 0)
    result.setdefault("socket_errors", 0)
    return result


def pss_kb(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return None


def run_memory(cluster, count):
    samples, errors = run_concurrent(cluster, "hello", count, 4)
    pss = []
    for sandbox in cluster.sandboxes():
        if sandbox["state"] == "idle" and sandbox["pid"]:
            try:
                pss.append(pss_kb(sandbox["pid"]))
            except OSError:
                pass
    return {"alive": len(pss), "pss_kb": pss, "errors": errors,
            "worker_rss_kb": rss_kb(cluster.worker_pid())}


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def run_churn(seconds, concurrency):
    done = subprocess.run([PYTHON, os.path.join(HERE, "churn.py"), str(seconds),
                           str(concurrency), "--json"], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout)


def run_soak(tmp, seconds):
    """Four clients for `seconds` against a worker of its own that holds at
    most SOAK_LIVE sandboxes of SOAK_FUNCTIONS functions: half the calls
    warm (one function per client), half cold starts of the others in
    turn, each evicting an idle sandbox; every 100th warm call follows an
    edit of its function's code, and is a cold start too.  The worker's RSS
    is sampled throughout: it must not grow once the worker has seen every
    function.  A worker that dies ends the soak, as an error."""
    cluster = Cluster(tmp, "soak", SOAK_FUNCTIONS // 2, max_sandboxes=SOAK_LIVE, pool_size=16)
    try:
        settle()
        pid = cluster.worker_pid()
        hot = ["hello-%d" % i for i in range(4)]
        cold = ["%s-%d" % (handler, i) for i in range(SOAK_FUNCTIONS // 2)
                for handler in ("hello", "heavy") if "%s-%d" % (handler, i) not in hot]
        end = time.monotonic() + seconds
        stop = threading.Event()
        tallies = [{"warm": 0, "cold": 0, "edits": 0} for _ in range(4)]
        errors = []

        def client_loop(k):
            # Every other call is warm, to this client's own hot function;
            # the others go through the cold list, interleaved with the
            # other clients'.
            counts = tallies[k]
            client = Client(cluster.port)
            j = 0
            while not stop.is_set() and time.monotonic() < end:
                j += 1
                try:
                    if j % 2:
                        name, kind = cold[(j // 2 * 4 + k) % len(cold)], "cold"
                    elif j % 200 == 0:  # a new version: this call is a cold start
                        name, kind = hot[k], "edits"
                        with open(os.path.join(cluster.path, "registry", name,
                                               "lambda_func.py"), "w") as f:
                            f.write("def handler(event):\n    return %d\n" % j)
                    else:
                        name, kind = hot[k], "warm"
                    call(client, name)
                    counts[kind] += 1
                except (RuntimeError, OSError) as e:
                    errors.append(str(e))
                    client.close()
            client.close()

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        rss, start, died = [], time.monotonic(), None

        def sample():
            kb = rss_kb(pid)
            if kb is None:  # exiting: no memory left to report
                raise OSError
            rss.append((round(time.monotonic() - start, 1), kb))

        try:
            while any(t.is_alive() for t in threads):
                sample()
                print("  %4.0f s: %d calls, worker RSS %.1f MB" % (
                    rss[-1][0], sum(sum(t.values()) for t in tallies), rss[-1][1] / 1024),
                    flush=True)
                stop.wait(max(1.0, seconds / 60))
            sample()  # at the end
        except OSError:  # its /proc entry is gone
            died = "the worker (pid %d) died %.0f s into the soak" % (pid, time.monotonic() - start)
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        cluster.kill()
    total = {key: sum(t[key] for t in tallies) for key in tallies[0]}
    return {"seconds": seconds, "calls": sum(total.values()),
            "cold_calls": total["cold"] + total["edits"], "edits": total["edits"],
            "errors": errors[:20], "error_count": len(errors), "died": died, "rss_kb": rss}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke test")
    parser.add_argument("--no-peers", action="store_true", help="skip chroot, bwrap, crun, runc")
    parser.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                        help="also run a soak of this length and record the worker's memory")
    parser.add_argument("--out", default=os.path.join(REPO, "bench-results"),
                        help="where results go (a new folder per run)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it builds sandboxes)")
    if not os.path.exists(os.path.join(ROOTFS, ".ol-rootfs.json")):
        sys.exit("bench: no rootfs at %s: run `make` first" % ROOTFS)

    n = 20 if args.quick else 200        # back-to-back samples per way
    n_idle = 10 if args.quick else 50    # samples with 200 ms idle gaps, half per handler
    n_peer = 10 if args.quick else 50
    n_many = 40 if args.quick else 200
    n_memory = 50 if args.quick else 500
    copies = n + n_idle + 3 * n + n_many + n_memory + 50
    total = 10 + bool(args.soak)
    out = os.path.join(args.out, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    tmp = tempfile.mkdtemp(prefix="olbench-")
    # However the run ends (Ctrl-C included): its clusters' files go too.
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    results = {"host": report.host_info(), "quick": args.quick, "runs": []}
    clusters = []

    def record(way, handler, scenario, samples, timings=(), **extra):
        results["runs"].append(dict(way=way, handler=handler, scenario=scenario,
                                    samples=samples, timings=list(timings), **extra))
    try:
        step(1, total, "starting five workers: zygote, hostnet, egress, halting, fresh")
        zygote = Cluster(tmp, "zygote", copies, max_sandboxes=copies + 100, pool_size=16)
        clusters.append(zygote)
        fresh = Cluster(tmp, "fresh", n + n_idle, zygote=False, max_sandboxes=copies + 100)
        clusters.append(fresh)
        hostnet = Cluster(tmp, "hostnet", n + n_idle, network_isolation=False,
                          max_sandboxes=copies + 100, pool_size=16)
        clusters.append(hostnet)
        # At most 253 egress sandboxes live at once per worker: hello only.
        egress = Cluster(tmp, "egress", n + n_idle, egress=True, max_sandboxes=copies + 100,
                         pool_size=16)
        clusters.append(egress)
        halting = Cluster(tmp, "halting", n + n_idle, cpu_wake_latency_us=None,
                          max_sandboxes=copies + 100, pool_size=16)
        clusters.append(halting)
        settle()

        step(2, total, "vCPU stalls before the scenarios (a spinning process per vCPU)")
        results["stalls"] = [stalls.measure(1 if args.quick else 3)]
        print("  " + stalls.describe(results["stalls"][0]), flush=True)

        step(3, total, "cold starts back to back (n=%d per handler and way)" % n)
        for handler in ("hello", "heavy"):
            ways = [("zygote", zygote), ("hostnet", hostnet), ("fresh", fresh)]
            if handler == "hello":
                ways[2:2] = [("egress", egress), ("halting", halting)]
            for way, cluster in ways:
                if cluster is halting:
                    after_requests_lapse()
                samples, timings = run_sequential(cluster, handler, n, 0)
                record(way, handler, "back-to-back", samples, timings)
            samples, timings = run_sequential(zygote, handler, n * 5, 0, warm=True)
            record("warm", handler, "back-to-back", samples, timings)
            if handler == "hello":
                after_requests_lapse()
                samples, timings = run_sequential(halting, handler, n * 5, 0, warm=True)
                record("warm-halting", handler, "back-to-back", samples, timings)

        step(4, total, "cold starts after 200 ms idle gaps (n=%d per handler and way)"
             % (n_idle // 2))
        for cluster in (zygote, hostnet, egress, halting, fresh):
            cluster.restart()
        for handler in ("hello", "heavy"):
            ways = [("zygote", zygote), ("hostnet", hostnet), ("fresh", fresh)]
            if handler == "hello":
                ways[2:2] = [("egress", egress), ("halting", halting)]
            for way, cluster in ways:
                samples, timings = run_sequential(cluster, handler, n_idle // 2, 0.2)
                record(way, handler, "idle-200ms", samples, timings)
            samples, timings = run_sequential(zygote, handler, n_idle // 2, 0.2, warm=True)
            record("warm", handler, "idle-200ms", samples, timings)
            if handler == "hello":
                samples, timings = run_sequential(halting, handler, n_idle // 2, 0.2, warm=True)
                record("warm-halting", handler, "idle-200ms", samples, timings)

        step(5, total, "cold starts at concurrency 1, 2 and 8 (n=%d each)" % n)
        for c in (1, 2, 8):
            zygote.restart()
            samples, errors = run_concurrent(zygote, "hello", n, c)
            record("zygote", "hello", "concurrency-%d" % c, samples, errors=errors)

        step(6, total, "%d distinct functions, cold, concurrency 8" % n_many)
        zygote.restart()
        samples, errors = run_concurrent(zygote, "hello", n_many, 8)
        record("zygote", "hello", "many-functions-c8", samples, errors=errors)

        step(7, total, "warm throughput with keep-alive (wrk, 8 connections)")
        zygote.restart()
        results["throughput"] = run_wrk(zygote, 3 if args.quick else 10, 8)

        step(8, total, "memory of %d idle warm handlers" % n_memory)
        zygote.restart()
        results["memory"] = run_memory(zygote, n_memory)

        if args.soak:
            step(9, total, "soak for %d s: warm calls, cold starts that evict, edits" % args.soak)
            zygote.kill()
            results["soak"] = run_soak(tmp, args.soak)
    finally:
        for cluster in clusters:
            cluster.kill()

    # Again once the workers' sandboxes are gone: the host's noise changes
    # over a run.
    settle()
    results["stalls"].append(stalls.measure(1 if args.quick else 3))
    print("  vCPU stalls after the worker scenarios: " + stalls.describe(results["stalls"][-1]),
          flush=True)

    step(total - 1, total, "sandbox churn: create + call + destroy, concurrency 8")
    results["churn"] = run_churn(2 if args.quick else 5, 8)

    step(total, total, "peers: skipped (--no-peers)" if args.no_peers else
         "peers: chroot, bwrap, crun, runc (n=%d, and %d after idle)" % (n_peer, n_idle // 2))
    if not args.no_peers:
        jobs = []
        for handler in ("hello", "heavy"):
            for peer in PEERS:
                jobs.append({"peer": peer, "handler": handler, "scenario": "back-to-back",
                             "n": n_peer, "gap": 0})
                jobs.append({"peer": peer, "handler": handler, "scenario": "idle-200ms",
                             "n": n_idle // 2, "gap": 0.2})
        for r in run_peers(jobs, tmp):
            record(r["peer"], r["handler"], r["scenario"], r.get("samples", []),
                   error=r.get("error"))

    os.makedirs(out)
    report.write(results, out)
    print(open(os.path.join(out, "summary.md")).read())
    print("results in %s (results.json, summary.md, latency.png%s)"
          % (out, ", soak.png" if args.soak else ""))


if __name__ == "__main__":
    # `kill` stops it as Ctrl-C does: its workers stopped, its clusters removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        print("\nbench: interrupted; its workers are stopped, and no results were written",
              file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        report.reader_gone()
