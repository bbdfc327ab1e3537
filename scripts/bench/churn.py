"""Sandbox churn: how many sandboxes per second can be created, called once
and destroyed, with the sandbox package driven directly (no HTTP).  As
root, after `make`:

    .venv/bin/python scripts/bench/churn.py [SECONDS] [CONCURRENCY] [--json]
"""
import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import uvloop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from rootfs.prepare import check_dir  # noqa: E402
from sandbox.manager import SandboxConfig, SandboxManager  # noqa: E402
from worker.functions import Channel  # noqa: E402
import report  # noqa: E402  (next to this file)


async def churn(seconds, concurrency):
    code = tempfile.mkdtemp(prefix="olchurn-")
    os.chmod(code, 0o755)  # handlers run as nobody
    with open(os.path.join(code, "lambda_func.py"), "w") as f:
        f.write("def handler(event):\n    return 'Hello'\n")
    log = os.open(os.devnull, os.O_WRONLY)
    manager = SandboxManager(SandboxConfig(
        rootfs=check_dir(os.path.join(REPO, "build", "rootfs")), log_fd=log, hostname="churn",
        cgroup_root="openlambda/bench-churn-%d/w" % os.getpid(), pool_size=16,
        max_live=concurrency * 2))
    latencies = []
    end = time.monotonic() + seconds

    async def one_after_another():
        while time.monotonic() < end:
            start = time.perf_counter()
            sandbox = await manager.create(code, "churn")
            channel = Channel(sandbox.channel)
            reply = await channel.call({"id": "churn", "body": b"{}"})
            assert reply["status"] == "ok", reply
            channel.close()
            await manager.destroy(sandbox)
            latencies.append(time.perf_counter() - start)

    tasks = []
    try:
        # In the try: a failed start leaves cgroups that shutdown removes.
        await manager.start()
        started = time.monotonic()
        tasks = [asyncio.ensure_future(one_after_another()) for _ in range(concurrency)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        elapsed = time.monotonic() - started
        for task in done:
            task.result()  # the first failure, if any
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await manager.shutdown()
        os.unlink(os.path.join(code, "lambda_func.py"))
        os.rmdir(code)
    return {"seconds": round(elapsed, 3), "concurrency": concurrency,
            "completed": len(latencies), "per_s": len(latencies) / elapsed,
            "netns_joined": manager.loopback.joined, "netns_refused": manager.loopback.refused,
            "rehearsed": manager.rehearsed, "unrehearsed": manager.unrehearsed,
            "samples": latencies}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", nargs="?", type=float, default=5.0,
                        help="how long to run (default 5)")
    parser.add_argument("concurrency", nargs="?", type=int, default=8,
                        help="create-call-destroy loops at once (default 8)")
    parser.add_argument("--json", action="store_true",
                        help="print everything, the raw samples included, as JSON")
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1:
        parser.error("SECONDS must be above 0 and CONCURRENCY at least 1")
    if os.geteuid() != 0:
        sys.exit("churn: run as root (it builds sandboxes)")
    try:
        # The worker's event loop: the sandbox package is measured as it runs there.
        result = uvloop.run(churn(args.seconds, args.concurrency))
    except KeyboardInterrupt:
        sys.exit(130)  # its sandboxes are gone: churn() shuts its manager down
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(report.churn_lines(result)))
        print("  (the target is %d/s: %s)" % (report.CHURN_TARGET, "met" if result["per_s"]
                                              >= report.CHURN_TARGET else "missed"))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        report.reader_gone()
