"""How often, and for how long, the vCPUs are taken away from a process that
never sleeps, measured in the same run as the latencies while nothing of
ours runs.

On a shared VM the hypervisor stops vCPUs now and then (here 0.5 to 9 ms, a
few times a second), and the guest's own kernel threads run too; a spinning
process cannot tell the two apart, but the guest's steal time (/proc/stat),
reported alongside, counts what the hypervisor owned up to.  A cold start
that overlaps such a stall takes that much longer, whatever the sandbox
does: it sets a floor under the p99 of any short call.

    .venv/bin/python scripts/bench/stalls.py [SECONDS]
"""
import argparse
import json
import os
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


def steal_seconds():
    """All vCPUs' steal time so far, as the guest's kernel counts it."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def measure(seconds=3.0):
    """A spinning process pinned to each CPU at once, for `seconds`:
    {"seconds", "cpus", "per_cpu_per_s", "lost_ms_per_s", "p50_ms",
    "max_ms", "steal_ms_per_s"} (p50 and max of the stalls' lengths), or
    {"error"} if a probe failed."""
    children = []
    steal = steal_seconds()
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
    gaps, failed = [], []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            failed.append("probe %d exited with status %d"
                          % (pid, os.waitstatus_to_exitcode(status)))
        else:
            gaps += json.loads(data)
    if failed:
        return {"error": "; ".join(failed)}
    gaps.sort()
    cpus = len(children)
    return {"seconds": seconds, "cpus": cpus,
            "per_cpu_per_s": len(gaps) / cpus / seconds,
            "lost_ms_per_s": sum(gaps) * 1e3 / cpus / seconds,
            "p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else 0.0,
            "max_ms": gaps[-1] * 1e3 if gaps else 0.0,
            "steal_ms_per_s": (steal_seconds() - steal) * 1e3 / cpus / seconds}


def describe(stalls):
    """One line for the summary."""
    if "error" in stalls:
        return "not measured: %s" % stalls["error"]
    return ("%.1f stalls of over %.1f ms per second on each of %d vCPUs (median %.2f ms, "
            "longest %.2f ms): %.1f ms lost per second, of which the guest counted %.1f as "
            "steal; %g s measured"
            % (stalls["per_cpu_per_s"], THRESHOLD * 1e3, stalls["cpus"], stalls["p50_ms"],
               stalls["max_ms"], stalls["lost_ms_per_s"], stalls.get("steal_ms_per_s", 0.0),
               stalls["seconds"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", nargs="?", type=float, default=3.0,
                        help="how long to measure (default 3)")
    seconds = parser.parse_args().seconds
    if seconds <= 0:
        parser.error("SECONDS must be above 0")
    try:
        print(describe(measure(seconds)))
    except BrokenPipeError:
        from report import reader_gone  # report imports this module
        reader_gone()
