"""The benchmark suite runs and writes its JSON, tables and plot (a quick
run without the peers, and a short soak: the numbers are not checked, only
that it works)."""
import json
import os
import signal
import subprocess

from conftest import REPO, cluster_leftovers


def test_quick_bench_writes_json_markdown_and_plot(tmp_path):
    done = subprocess.run([os.path.join(REPO, ".venv/bin/python"), "scripts/bench/run.py",
                           "--quick", "--no-peers", "--soak", "10", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[1/11]" in done.stdout and "## Targets" in done.stdout  # progress, then the table
    (run,) = os.listdir(tmp_path)
    out = tmp_path / run
    results = json.loads((out / "results.json").read_text())
    ways = {r["way"] for r in results["runs"]}
    assert {"zygote", "hostnet", "egress", "halting", "warm", "warm-halting", "fresh"} <= ways
    zygote = [r for r in results["runs"] if r["way"] == "zygote" and r["summary"]]
    assert all(r["summary"]["n"] > 0 for r in zygote)
    throughput = results["throughput"]  # an error where wrk is not installed
    assert throughput.get("requests_per_s", 0) > 0 or "wrk is not installed" in throughput["error"]
    assert len(results["stalls"]) == 2 and results["stalls"][0]["cpus"] == len(os.sched_getaffinity(0))
    summary = (out / "summary.md").read_text()
    assert "| zygote |" in summary and "- before the scenarios: " in summary
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    soak = results["soak"]
    assert soak["cold_calls"] > 0 and soak["calls"] > soak["cold_calls"] and len(soak["rss_kb"]) > 2
    assert "worker RSS over a 10 s soak" in summary
    assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
    assert [line for line in open("/proc/self/mountinfo") if "olbench" in line] == []
    assert cluster_leftovers("/nonexistent") == []  # no process left in another root


def test_a_bench_stopped_with_sigterm_leaves_nothing(tmp_path):
    bench = subprocess.Popen([os.path.join(REPO, ".venv/bin/python"), "scripts/bench/run.py",
                              "--quick", "--no-peers", "--out", str(tmp_path)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))  # its progress as it goes
    try:
        for line in bench.stdout:
            if line.startswith("[3/"):  # its workers are up and being called
                break
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 130 and "interrupted; its workers are stopped" in err, err
    assert os.listdir(tmp_path) == []  # no results
    assert [line for line in open("/proc/self/mountinfo") if "olbench" in line] == []
    assert cluster_leftovers("/nonexistent") == []
    assert subprocess.run(["pgrep", "-f", "olbench-"], capture_output=True).stdout == b""


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `churn.py | head -1`: the lines after the first meet a closed pipe.
    for script in (["scripts/bench/churn.py", "0.3", "2"], ["scripts/bench/stalls.py", "0.2"]):
        done = subprocess.run(os.path.join(REPO, ".venv/bin/python") + " %s | true"
                              % " ".join(script), shell=True, cwd=REPO, capture_output=True,
                              text=True, timeout=60, executable="/bin/bash")
        assert done.stderr == "", done.stderr
    assert cluster_leftovers("/nonexistent") == []
