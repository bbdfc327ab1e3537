"""The host's own noise, measured in the same run as the latencies: how
often, and for how long, a process that never sleeps is kept off its vCPU
while nothing else of ours runs.

On a shared VM the hypervisor stops vCPUs now and then (here 1 to 9 ms, a
few times a second).  A cold start that overlaps such a stall takes that
much longer, whatever the sandbox does: it sets a floor under the p99 of
any short call, and this says how high.

    .venv/bin/python scripts/bench/stalls.py [SECONDS]
"""
import json
import os
import sys
import time

# A gap longer than this between two reads of the clock is a stall: the
# loop itself takes well under a microsecond a turn.
THRESHOLD = 0.0005


def spin(seconds):
    """Gaps (s) above THRESHOLD seen by a loop reading the clock."""
    clock = time.perf_counter
    gaps = []
    last = start = clock()
    end = start + seconds
    while last < end:
        now = clock()
        if now - last > THRESHOLD:
            gaps.append(now - last)
        last = now
    return gaps


def measure(seconds=3.0):
    """A spinning process pinned to each CPU at once, for `seconds`:
    {"seconds", "cpus", "per_cpu_per_s", "lost_ms_per_s", "p50_ms", "max_ms"}
    over all of them (p50 and max of the stalls' lengths)."""
    children = []
    for cpu in sorted(os.sched_getaffinity(0)):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(r)
                os.sched_setaffinity(0, {cpu})
                os.write(w, json.dumps(spin(seconds)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        children.append((pid, r))
    gaps = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError("stall probe (pid %d) failed with status %d" % (pid, status))
        gaps += json.loads(data)
    gaps.sort()
    cpus = len(children)
    return {"seconds": seconds, "cpus": cpus,
            "per_cpu_per_s": len(gaps) / cpus / seconds,
            "lost_ms_per_s": sum(gaps) * 1e3 / cpus / seconds,
            "p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else 0.0,
            "max_ms": gaps[-1] * 1e3 if gaps else 0.0}


def describe(stalls):
    """One line for the summary."""
    return ("%.1f stalls of over %.1f ms per second on each of %d vCPUs (median %.2f ms, "
            "longest %.2f ms): %.1f ms lost per second, %.0f s measured"
            % (stalls["per_cpu_per_s"], THRESHOLD * 1e3, stalls["cpus"], stalls["p50_ms"],
               stalls["max_ms"], stalls["lost_ms_per_s"], stalls["seconds"]))


if __name__ == "__main__":
    print(describe(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)))
