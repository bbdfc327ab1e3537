"""Turn a benchmark run into results.json, summary.md and latency.png."""
import json
import os
import platform
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import stalls  # noqa: E402  (next to this file)


def reader_gone():
    """Our stdout's reader left (`| head`): stop quietly, as `cat` does.
    The BrokenPipeError ran every cleanup on its way up."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


# Each way, as summary.md explains it.
WAYS = {
    "zygote": "our sandbox forked from the zygote (the default worker)",
    "hostnet": "the same without a network namespace of its own (network_isolation false)",
    "egress": "the same with egress (ol.yaml egress: true): a veth, an address and NAT",
    "halting": "zygote without the request that idle CPUs be quick to wake "
               "(cpu_wake_latency_us null)",
    "warm": "a call on a live handler of the default worker",
    "warm-halting": "the same on the halting worker",
    "fresh": "our sandbox with a fresh interpreter instead of the zygote (zygote false)",
    "chroot": "a fresh python3 in the rootfs, no namespaces: the floor without a zygote",
    "bwrap": "bwrap --unshare-all running the handler",
    "crun": "crun with an OCI bundle of the same rootfs",
    "runc": "runc with the same bundle",
}
CHURN_TARGET = 500  # sandboxes created, called once and destroyed per second
PHASES = ("total", "worker", "egress", "wait", "fork", "cgroup", "mounts", "interpreter", "wake",
          "attach", "drop", "load", "handler", "ipc")


def host_info():
    from sandbox.cgroups import mode
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), "?")
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": model,
            "cgroups": mode().name, "python": platform.python_version()}


def pct(sorted_ms, p):
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p))]


def summarize(samples):
    """Quantiles in ms of samples in seconds."""
    if not samples:
        return None
    ms = sorted(s * 1e3 for s in samples)
    return {"n": len(ms), "p50": pct(ms, 0.5), "p90": pct(ms, 0.9), "p99": pct(ms, 0.99),
            "mean": statistics.fmean(ms), "max": ms[-1]}


def find(results, way, handler, scenario):
    for run in results["runs"]:
        if (run["way"], run["handler"], run["scenario"]) == (way, handler, scenario):
            return run
    return None


def latency_table(results, handler, scenario):
    base = find(results, "zygote", handler, scenario)
    base_p50 = base["summary"]["p50"] if base and base.get("summary") else None
    lines = ["| way | p50 ms | p90 ms | p99 ms | n | p50 vs zygote |",
             "|---|---:|---:|---:|---:|---:|"]
    for way in WAYS:
        run = find(results, way, handler, scenario)
        if run is None:
            continue
        s = run.get("summary")
        if not s:
            lines.append("| %s | %s | | | 0 | |" % (way, run.get("error") or "no samples"))
            continue
        ratio = "%.1f×" % (s["p50"] / base_p50) if base_p50 else ""
        lines.append("| %s | %.2f | %.2f | %.2f | %d | %s |" % (
            way, s["p50"], s["p90"], s["p99"], s["n"], ratio))
    return lines


def phase_table(results):
    columns = PHASES[:1] + ("outside",) + PHASES[1:]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for way, handler, scenario in (("zygote", "hello", "back-to-back"),
                                   ("zygote", "hello", "idle-200ms"),
                                   ("hostnet", "hello", "back-to-back"),
                                   ("egress", "hello", "back-to-back"),
                                   ("zygote", "heavy", "back-to-back"),
                                   ("fresh", "hello", "back-to-back"),
                                   ("warm", "hello", "back-to-back"),
                                   ("warm-halting", "hello", "back-to-back")):
        run = find(results, way, handler, scenario)
        if not run or not run.get("timings"):
            continue
        cells = []
        for phase in columns:
            if phase == "outside":  # the client's time less the worker's total
                values = sorted(s * 1e3 - t["total"] for s, t in zip(run["samples"],
                                                                    run["timings"])
                                if "total" in t)
            else:
                values = sorted(t[phase] for t in run["timings"] if phase in t)
            cells.append("%.3f" % values[len(values) // 2] if values else "")
        lines.append("| %s %s %s | %s |" % (way, handler, scenario, " | ".join(cells)))
    return lines


def targets(results):
    """(measure, target, measured, met) for the cold-start issue's targets."""
    rows = []

    def p(way, handler, scenario, key):
        run = find(results, way, handler, scenario)
        return run["summary"][key] if run and run.get("summary") else None

    for scenario in ("back-to-back", "idle-200ms"):
        p50, p99 = p("zygote", "hello", scenario, "p50"), p("zygote", "hello", scenario, "p99")
        if p50 is not None:
            n = p("zygote", "hello", scenario, "n")
            rows.append(("cold hello %s p50" % scenario, "≤ 2 ms", "%.2f ms (n=%d)" % (p50, n),
                         p50 <= 2))
            rows.append(("cold hello %s p99" % scenario, "≤ 5 ms", "%.2f ms (n=%d)" % (p99, n),
                         p99 <= 5))
    zp50 = p("zygote", "hello", "back-to-back", "p50")
    for peer in ("bwrap", "crun"):
        peer_p50 = p(peer, "hello", "back-to-back", "p50")
        if zp50 and peer_p50:
            ratio = peer_p50 / zp50
            rows.append(("%s p50 / zygote p50" % peer, "≥ 6×", "%.1f×" % ratio, ratio >= 6))
    warm = p("warm", "hello", "back-to-back", "p50")
    if warm is not None:
        rows.append(("warm call p50", "≤ 0.3 ms", "%.3f ms (n=%d)" % (
            warm, p("warm", "hello", "back-to-back", "n")), warm <= 0.3))
    tp = results.get("throughput", {})
    if "requests_per_s" in tp:
        errors = tp["non_2xx"] + tp["socket_errors"]
        rows.append(("warm throughput, keep-alive", "≥ 3000/s, 0 errors",
                     "%.0f/s, %d errors" % (tp["requests_per_s"], errors),
                     tp["requests_per_s"] >= 3000 and errors == 0))
    many = find(results, "zygote", "hello", "many-functions-c8")
    if many and many.get("summary"):
        errors = len(many.get("errors") or [])
        rows.append(("%d functions cold, c=8" % many["summary"]["n"], "0 errors, p99 ≤ 20 ms",
                     "%d errors, p99 %.2f ms" % (errors, many["summary"]["p99"]),
                     errors == 0 and many["summary"]["p99"] <= 20))
    churn = results.get("churn", {})
    if "per_s" in churn:
        rows.append(("sandbox churn (create + call + destroy)", "≥ %d/s" % CHURN_TARGET,
                     "%.0f/s" % churn["per_s"], churn["per_s"] >= CHURN_TARGET))
    elif "error" in churn:
        rows.append(("sandbox churn (create + call + destroy)", "≥ %d/s" % CHURN_TARGET,
                     "failed: %s" % churn["error"].splitlines()[-1][:120], False))
    mem = results.get("memory", {})
    if mem.get("pss_kb"):
        median = statistics.median(mem["pss_kb"]) / 1024
        rows.append(("PSS per idle warm handler, %d alive" % mem["alive"], "≤ 3 MB",
                     "%.2f MB median" % median, median <= 3))
    soak = results.get("soak")
    if soak:
        # From a fifth of the way in: by then the worker has seen every
        # function and filled its pools.
        first = next((kb for t, kb in soak["rss_kb"] if t >= soak["seconds"] / 5), None)
        measure = "worker RSS over a %d s soak (%d calls, %d cold)" % (
            soak["seconds"], soak["calls"], soak["cold_calls"])
        if soak.get("died") or first is None or len(soak["rss_kb"]) < 3:
            rows.append((measure, "flat, zero errors", "ended early: %s" % (
                soak.get("died") or "too few samples"), False))
        else:
            last = soak["rss_kb"][-1][1]
            rows.append((measure, "flat, zero errors", "%.1f → %.1f MB, %d errors" % (
                first / 1024, last / 1024, soak["error_count"]),
                last <= first * 1.1 and not soak["error_count"]))
    return rows


def markdown(results):
    host = results["host"]
    out = ["# Cold-start benchmark", "",
           "Host: %(cpus)d CPUs (%(cpu)s), Linux %(kernel)s, cgroups %(cgroups)s." % host,
           "Latencies in ms. Ours (zygote, hostnet, egress, halting, warm, warm-halting, "
           "fresh) are HTTP end to end from a client on the same host; peers (chroot, bwrap, "
           "crun, runc) are spawn-to-exit of the tool running the same handler on the same "
           "rootfs. Idle CPUs are kept quick to wake while calls come in "
           "(`cpu_wake_latency_us`, 0 by default), and while each peer runs.",
           ""] + ["- %s: %s" % (way, what) for way, what in WAYS.items()] + [
           "", "## Targets", ""]
    if results["quick"]:
        out += ["QUICK RUN: few samples (a p99 of under 100 is their maximum), so each "
                "verdict is only indicative: run without --quick to judge.", ""]
    out += ["| measure | target | measured | |", "|---|---|---|---|"]
    for measure, target, measured, met in targets(results):
        verdict = "met" if met else "**missed**"
        out.append("| %s | %s | %s | %s |" % (measure, target, measured,
                                             verdict + " (indicative)" if results["quick"]
                                             else verdict))
    if results.get("stalls"):
        out += ["", "Stalls: the time a spinning process on each vCPU lost while nothing of "
                "ours ran (`stalls.py`), to the hypervisor or the guest kernel's own work. A "
                "call that overlaps one takes that much longer, whatever the sandbox does.", ""]
        out += ["- %s: %s" % (when, stalls.describe(measured))
                for when, measured in zip(("before the scenarios", "after the worker scenarios"),
                                          results["stalls"])]
    for handler in ("hello", "heavy"):
        for scenario in ("back-to-back", "idle-200ms"):
            out += ["", "## %s, %s" % (handler, scenario), ""]
            out += latency_table(results, handler, scenario)
    out += ["", "## Concurrency (hello, zygote, cold)", "",
            "| scenario | p50 ms | p99 ms | n | errors |", "|---|---:|---:|---:|---:|"]
    for run in results["runs"]:
        if run["scenario"].startswith(("concurrency", "many")) and run.get("summary"):
            s = run["summary"]
            out.append("| %s | %.2f | %.2f | %d | %d |" % (run["scenario"], s["p50"], s["p99"],
                                                         s["n"], len(run.get("errors") or [])))
    out += ["", "## Where the time goes (median ms per phase, from Server-Timing)", "",
            "outside: the client's time less the worker's total (HTTP on both sides, "
            "and the wake-ups of the worker and the client). fork, cgroup and mounts of a "
            "pooled shell happen before the request arrives.", ""]
    out += phase_table(results)
    tp, churn, mem = results.get("throughput", {}), results.get("churn", {}), results.get("memory", {})
    out += ["", "## Throughput, churn, memory", ""]
    if "requests_per_s" in tp:
        out.append("- warm throughput (wrk, %d connections, %d s): %.0f requests/s, %d non-2xx, "
                   "%d socket errors" % (tp["connections"], tp["seconds"], tp["requests_per_s"],
                                         tp["non_2xx"], tp["socket_errors"]))
    if "per_s" in churn:
        out += churn_lines(churn)
    if mem.get("pss_kb"):
        out.append("- %d idle warm handlers: PSS median %.2f MB, mean %.2f MB; worker RSS %.1f MB"
                   % (mem["alive"], statistics.median(mem["pss_kb"]) / 1024,
                      statistics.fmean(mem["pss_kb"]) / 1024, mem["worker_rss_kb"] / 1024))
    return "\n".join(out) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(2, 2, figsize=(15, 8), sharex=True)
    for row, scenario in enumerate(("back-to-back", "idle-200ms")):
        for col, handler in enumerate(("hello", "heavy")):
            ax = axes[row][col]
            for colour, way in enumerate(WAYS):
                run = find(results, way, handler, scenario)
                if not run or not run["samples"]:
                    continue
                ms = sorted(s * 1e3 for s in run["samples"])
                # A way keeps its colour in every panel, whichever ways a panel lacks;
                # past the palette's ten colours, a dashed black line.
                ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post",
                        color="C%d" % colour if colour < 10 else "black",
                        linestyle="-" if colour < 10 else "--",
                        label="%s (p50 %.2f, n=%d)" % (way, pct(ms, 0.5), len(ms)))
            ax.set_xscale("log")
            # Shared axes hide the top row's tick labels; its xlabel would be
            # left naming nothing.  Plain numbers read faster than 10^x.
            ax.tick_params(labelbottom=True)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: "%g" % v))
            ax.set_title("%s, %s" % (handler, scenario))
            ax.set_xlabel("latency (ms, log scale)")
            ax.set_ylabel("fraction of calls")
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="both", alpha=0.3)
            # Beside the panel, not on it: no corner of a panel is free of curves.
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Latency CDFs, cold starts and warm calls: OpenLambda-in-Python vs. peers, "
                 "same rootfs%s" % (" (QUICK RUN: few samples)" if results["quick"] else ""))
    fig.text(0.01, 0.005, "Ours: HTTP end to end from a client on the same host. Peers (chroot, "
             "bwrap, crun, runc): from spawning the tool to its exit. Ways: summary.md.",
             fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)


def plot_soak(soak, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t for t, _ in soak["rss_kb"]], [kb / 1024 for _, kb in soak["rss_kb"]], marker=".")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("worker RSS (MB)")
    ax.set_title("Worker memory over a %d s soak: %d calls, %d of them cold starts "
                 "(%d after an edit)" % (soak["seconds"], soak["calls"], soak["cold_calls"],
                                         soak["edits"]))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(results, out):
    for run in results["runs"]:
        run["summary"] = summarize(run["samples"])
    results["targets"] = [dict(zip(("measure", "target", "measured", "met"), row))
                          for row in targets(results)]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(out, "latency.png"))
    if results.get("soak"):
        plot_soak(results["soak"], os.path.join(out, "soak.png"))


def churn_lines(churn):
    """What scripts/bench/churn.py measured, as the summary's lines."""
    s = summarize(churn["samples"])
    lines = ["- sandbox churn (create, one call, destroy; concurrency %d): %.0f/s, "
             "each p50 %.2f ms p99 %.2f ms" % (churn["concurrency"], churn["per_s"],
                                              s["p50"], s["p99"])]
    if "netns_joined" in churn:
        lines.append("  (shells that joined a used network namespace: %d; that found a trace "
                     "in one and made their own: %d)"
                     % (churn["netns_joined"], churn["netns_refused"]))
    if "rehearsed" in churn:
        lines.append("  (shells that rehearsed a call before they were ready: %d; that did not, "
                     "forked while calls waited for shells: %d)"
                     % (churn["rehearsed"], churn["unrehearsed"]))
    return lines
