"""Hostile handlers: each attack fails, gets a correct answer, and the worker,
the zygote and neighbouring functions keep serving."""
import concurrent.futures
import json
import os
import time

import pytest

from conftest import Worker


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    # A worker of its own: these tests burn CPU and processes.
    from conftest import start_cluster, stop_cluster
    w = start_cluster(tmp_path_factory.mktemp("hostile"),
                      limits={"procs": 32, "cpu_percent": 50, "runtime_sec": 10})
    yield w
    stop_cluster(w)


def other_client(worker):
    return Worker(worker.path, worker.port)


def test_fork_bomb_stops_at_pids_max_and_a_neighbour_answers_meanwhile(worker):
    worker.add_function("bomb", "import os, time\n"
                                "def handler(event):\n"
                                "    made, refused = 0, 0\n"
                                "    for _ in range(500):\n"
                                "        try:\n"
                                "            if os.fork() == 0:\n"
                                "                time.sleep(30)\n"
                                "                os._exit(0)\n"
                                "            made += 1\n"
                                "        except OSError:\n"
                                "            refused += 1\n"
                                "    return [made, refused]\n")
    neighbour = other_client(worker)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bomb = pool.submit(worker.call, "bomb", {})
        time.sleep(0.2)
        start = time.monotonic()
        assert neighbour.call("hello", {"name": "neighbour"})[2] == "Hello, neighbour!"
        assert time.monotonic() - start < 5  # answered during the bomb, not after it
        status, _, (made, refused) = bomb.result(timeout=30)
    assert status == 200 and made < 32 and refused > 0


def test_output_flood_is_capped_and_never_blocks(worker):
    worker.add_function("flood", "import sys\n"
                                 "def handler(event):\n"
                                 "    chunk = 'y' * 65535 + '\\n'\n"
                                 "    for _ in range(1600):\n"  # 100 MiB
                                 "        sys.stdout.write(chunk)\n"
                                 "    sys.stdout.flush()\n"
                                 "    return 'flooded'\n")
    start = time.monotonic()
    assert worker.call("flood", {})[::2] == (200, "flooded")
    assert time.monotonic() - start < 20  # the worker drained it as it came
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    time.sleep(0.5)
    assert os.path.getsize(log) < 5 << 20  # capped at 1 MiB per sandbox
    assert "the rest is dropped" in open(log, errors="replace").read()


def test_cpu_spinner_is_held_to_its_share(worker):
    worker.add_function("spin", "import time\n"
                                "def handler(event):\n"
                                "    end, n = time.monotonic() + 1.0, 0\n"
                                "    cpu = time.process_time()\n"
                                "    while time.monotonic() < end:\n"
                                "        n += 1\n"
                                "    return time.process_time() - cpu\n")
    status, _, cpu_seconds = worker.call("spin", {})
    assert status == 200 and cpu_seconds < 0.75  # cpu_percent 50 of 1 s of wall time


def test_handler_cannot_see_or_signal_the_worker_or_zygote(worker):
    worker_pid = int(open(os.path.join(worker.path, "workers", str(worker.port), "pid")).read())
    worker.add_function("killer", "import os, signal\n"
                                  "def handler(event):\n"
                                  "    out = {}\n"
                                  "    for pid in event['pids']:\n"
                                  "        try:\n"
                                  "            os.kill(pid, signal.SIGKILL)\n"
                                  "            out[pid] = 'killed'\n"
                                  "        except OSError as e:\n"
                                  "            out[pid] = e.__class__.__name__\n"
                                  "    out['visible'] = sorted(int(p) for p in os.listdir('/proc')"
                                  " if p.isdigit())\n"
                                  "    return out\n")
    status, _, out = worker.call("killer", {"pids": [worker_pid, 2, 300]})
    assert status == 200 and out["visible"] == [1]
    assert out[str(worker_pid)] == "ProcessLookupError"
    assert worker.request("GET", "/status")[0] == 200
    assert worker.call("hello", {"name": "still"})[2] == "Hello, still!"
