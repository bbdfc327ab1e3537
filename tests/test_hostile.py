"""Hostile handlers: each attack fails, gets a correct answer, and the worker,
the zygote and neighbouring functions keep serving."""
import base64
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


def test_output_flood_is_held_to_its_budget_and_never_blocks(worker):
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
    # The function's burst (4 MiB) and its rate's share while it flooded.
    assert os.path.getsize(log) < 6 << 20
    assert "[output of this function over 256 KiB/s: dropped from here]" in open(
        log, errors="replace").read()


def test_a_warm_sandbox_logging_a_line_a_call_goes_on_being_heard(worker):
    """Past 1 MiB in all (a line of 1 KiB a call), within its budget."""
    worker.add_function("chatty", "import itertools\n"
                                  "counter = itertools.count()\n"
                                  "def handler(event):\n"
                                  "    print('call %05d ' % next(counter) + 'c' * 1000)\n"
                                  "    return 'ok'\n")
    for _ in range(1200):
        assert worker.call("chatty", {})[0] == 200
    time.sleep(0.5)
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    with open(log, "rb") as f:
        calls = [line.split()[3] for line in f if line.startswith(b"[chatty sb-")]
    assert calls == [b"%05d" % i for i in range(1200)]


def test_output_after_a_flood_is_logged_again_with_what_was_dropped(worker):
    worker.add_function("burst", "import os\n"
                                 "def handler(event):\n"
                                 "    if event.get('flood'):\n"
                                 "        os.write(1, (b'b' * 1023 + b'\\n') * (20 << 10))\n"
                                 "    print('after the flood')\n"
                                 "    return 'ok'\n")
    assert worker.call("burst", {"flood": True})[0] == 200  # 20 MiB: over the burst
    time.sleep(0.6)  # the budget earns 150 KiB meanwhile
    assert worker.call("burst", {})[0] == 200  # the same sandbox, warm
    time.sleep(0.5)
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    with open(log, "rb") as f:
        mine = [line.split(b"] ", 1)[1] for line in f if line.startswith(b"[burst sb-")]
    assert mine[-2:] == [b"after the flood\n"] * 2, mine[-3:]  # both calls', heard
    counts = [int(line[1:].split()[0]) for line in mine
              if line.endswith(b" bytes of output were dropped]\n")]
    logged = 1024 * sum(1 for line in mine if line.startswith(b"bbb"))
    assert counts and sum(counts) + logged == 20 << 20, (counts, logged)


def test_a_function_that_floods_from_a_new_sandbox_each_call_is_held_to_a_rate(worker):
    """The 1 MiB per sandbox does not hold a function that crashes at each
    call (a new sandbox each time): its output has a budget of its own."""
    worker.add_function("crasher", "import os\n"
                                   "def handler(event):\n"
                                   "    os.write(1, (b'z' * 1023 + b'\\n') * 1024)\n"
                                   "    os._exit(1)\n")
    start = time.monotonic()
    for _ in range(16):  # 16 MiB of output
        assert worker.call("crasher", {})[0] == 502
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    with open(log, "rb") as f:
        mine = [line for line in f if line.startswith(b"[crasher sb-")]
    written = sum(len(line) for line in mine)
    assert written < (4 << 20) + (256 << 10) * (elapsed + 1) + (1 << 20), (written, elapsed)
    assert any(b"over 256 KiB/s: dropped from here" in line for line in mine)


def test_empty_lines_count_against_the_output_budget_too(worker):
    worker.add_function("blanks", "import os\n"
                                  "def handler(event):\n"
                                  "    os.write(1, b'\\n' * (1 << 20))\n"
                                  "    os._exit(1)\n")
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    size = os.path.getsize(log)
    start = time.monotonic()
    for _ in range(8):  # 8 MiB of newlines, each a prefixed line in the log
        assert worker.call("blanks", {})[0] == 502
    time.sleep(0.5)
    grown = os.path.getsize(log) - size
    assert grown < (4 << 20) + (256 << 10) * (time.monotonic() - start + 1) + (1 << 20), grown


def test_output_ending_at_its_cap_in_an_unfinished_line_is_written_whole(worker):
    worker.add_function("atcap", "import os\n"
                                 "def handler(event):\n"
                                 "    os.write(1, b'y\\n' + b'q' * ((1 << 20) - 2))\n"
                                 "    os._exit(3)\n")
    assert worker.call("atcap", {})[0] == 502
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    time.sleep(0.5)
    with open(log, "rb") as f:
        text = f.read()
    assert b"Exception in callback" not in text
    tail = [line for line in text.split(b"\n") if line.startswith(b"[atcap sb-")]
    assert sum(line.count(b"q") for line in tail) == (1 << 20) - 2  # its last line too


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


def with_config(worker, name, source, ol_yaml):
    d = worker.add_function(name, source)
    with open(os.path.join(d, "ol.yaml"), "w") as f:
        f.write(ol_yaml)


def test_a_response_over_its_limit_gets_502_and_the_function_still_works(worker):
    with_config(worker, "big-reply", "def handler(event):\n"
                                     "    return 'x' * event['n']\n",
                "limits: {response_kb: 4}\n")
    status, headers, body = worker.call("big-reply", {"n": 5000})
    assert status == 502 and body["errorType"] == "Runtime.ResponseTooLarge", body
    assert "over limits.response_kb (4 KiB)" in body["errorMessage"]
    assert worker.call("big-reply", {"n": 100})[2] == "x" * 100


def test_socket_buffers_count_against_the_memory_limit(worker):
    """Data queued on sockets it never reads is kernel memory a sandbox
    holds: it stays within mem_mb (on cgroup v1, which leaves it out of the
    memory limit, under a limit of its own as large)."""
    with_config(worker, "sockhog",
                "import socket\n"
                "def handler(event):\n"
                "    server = socket.create_server(('127.0.0.1', 0), backlog=200)\n"
                "    queued, kept = 0, []\n"
                "    for _ in range(event['pairs']):\n"
                "        a = socket.create_connection(server.getsockname())\n"
                "        b, _ = server.accept()\n"
                "        kept += [a, b]\n"
                "        a.setblocking(False)\n"
                "        try:\n"
                "            while True:\n"
                "                queued += a.send(b'x' * 65536)\n"
                "        except BlockingIOError:\n"
                "            pass\n"
                "    return queued\n",
                "limits: {mem_mb: 64}\n")
    status, _, queued = worker.call("sockhog", {"pairs": 60})
    assert status == 200 and queued < 80 << 20, queued  # ~300 MB without a limit
    assert worker.call("hello", {"name": "after"})[2] == "Hello, after!"


def test_a_handler_flooding_its_channel_gets_502(worker):
    # Past the runtime's own check: it writes straight to its socket.
    with_config(worker, "raw-flood",
                "import os, socket, stat\n"
                "def handler(event):\n"
                "    for fd in [int(fd) for fd in os.listdir('/proc/self/fd')]:\n"
                "        if fd > 2 and os.path.exists('/proc/self/fd/%d' % fd) \\\n"
                "                and stat.S_ISSOCK(os.fstat(fd).st_mode):\n"
                "            socket.socket(fileno=fd).sendall(b'\\xdb' + b'\\xff' * 4 + b'x' * (3 << 20))\n"
                "    return 'sent'\n",
                "limits: {response_kb: 64}\n")
    status, _, body = worker.call("raw-flood", {})
    assert status == 502 and body["errorType"] == "Runtime.ResponseTooLarge", body
    assert worker.call("big-reply", {"n": 10})[0] == 200  # the worker is fine


def test_rlimits_come_from_the_limits_and_cannot_be_raised(worker):
    with_config(worker, "rlimits",
                "import errno, os, resource\n"
                "def handler(event):\n"
                "    out = {'nofile': resource.getrlimit(resource.RLIMIT_NOFILE),\n"
                "           'fsize': resource.getrlimit(resource.RLIMIT_FSIZE)}\n"
                "    try:\n"
                "        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))\n"
                "        out['raise'] = 'succeeded'\n"
                "    except (OSError, ValueError) as e:\n"
                "        out['raise'] = type(e).__name__\n"
                "    try:\n"
                "        with open('/tmp/big', 'wb') as f:\n"
                "            f.write(b'x' * (2 << 20))\n"
                "        out['write'] = 'succeeded'\n"
                "    except OSError as e:\n"
                "        out['write'] = errno.errorcode[e.errno]\n"
                "    return out\n",
                "limits: {nofile: 100, fsize_mb: 1}\n")
    status, _, out = worker.call("rlimits", {})
    assert status == 200, out
    assert out["nofile"] == [100, 100] and out["fsize"] == [1 << 20, 1 << 20]
    assert out["raise"] in ("ValueError", "PermissionError")  # hard limit, no CAP_SYS_RESOURCE
    assert out["write"] == "EFBIG"


FORGER = """import base64, os, socket, stat
def handler(event):
    for fd in [int(fd) for fd in os.listdir('/proc/self/fd')]:
        if fd > 2 and os.path.exists('/proc/self/fd/%d' % fd) \\
                and stat.S_ISSOCK(os.fstat(fd).st_mode):
            socket.socket(fileno=os.dup(fd)).sendall(base64.b64decode(event['raw']))
    return 'honest'
"""


@pytest.mark.parametrize("raw", [
    b"\x81\xa6status\xa2ok",                        # ok without a body
    b"\x83\xa6status\xa2ok\xa4body\xc4\x011\xa3run\xa4soon",  # a timing that is no number
    b"\x81\xa6status\x91\xa1x",                    # a status that is a list
    b"\x83\xa6status\xa2ok\xa4body\xc4\x011\xaastackTrace\x01",  # a stack that is no list
    b"\xc1",                                          # not msgpack at all
], ids=["no-body", "bad-timing", "list-status", "bad-stack", "junk"])
def test_a_forged_reply_gets_502_and_frees_the_sandbox(worker, raw):
    # Handler code writes to its own channel before the runtime answers.
    name = "forger-%d" % len(raw)
    worker.add_function(name, FORGER)
    status, _, body = worker.call(name, {"raw": base64.b64encode(raw).decode()})
    assert status == 502 and body["errorType"] == "Runtime.ProtocolError", body
    listed = json.loads(worker.request("GET", "/sandboxes")[2])
    assert not [s for s in listed if s["function"] == name]  # destroyed, not left busy
    assert worker.call("hello", {})[0] == 200  # the worker is fine


# Forges a reply of the runtime's in answer to its call (naming the call's
# request id, as the runtime does), then, after `then_sleep`, returns 'late'.
ID_FORGER = """import msgpack, os, socket, stat, time
def channel():
    for fd in [int(fd) for fd in os.listdir('/proc/self/fd')]:
        if fd > 2 and os.path.exists('/proc/self/fd/%d' % fd) \\
                and stat.S_ISSOCK(os.fstat(fd).st_mode):
            return socket.socket(fileno=os.dup(fd))
def handler(event, context):
    if 'msg' in event:
        msg = dict(event['msg'])
        if not event.get('no_id'):
            msg['id'] = context.request_id
        if 'body' in msg:
            msg['body'] = msg['body'].encode()
        for key in ('run', 'received'):
            if key in msg:
                msg[key] = float(msg[key])
        channel().sendall(msgpack.packb(msg, use_bin_type=True))
    time.sleep(event.get('then_sleep', 0))
    return 'late'
"""


def test_a_forged_reply_answers_its_own_call_but_never_the_next(worker):
    # The function's own reply is its answer; the runtime's after it, held
    # back while the idle sandbox is frozen, must not answer the next call.
    worker.add_function("double", ID_FORGER)
    forged = {"msg": {"status": "ok", "body": '"forged"', "run": 0}, "then_sleep": 0.3}
    assert worker.call("double", forged)[::2] == (200, "forged")
    time.sleep(0.5)
    status, _, body = worker.call("double", {})
    assert (status, body["errorType"]) == (502, "Runtime.ProtocolError"), body
    assert worker.call("double", {})[::2] == (200, "late")  # a new sandbox


@pytest.mark.parametrize("msg,no_id", [
    ({"status": "setup_error", "errorMessage": "disk on fire, call the admins"}, True),
    ({"status": "init_error", "errorType": "Platform.SandboxError", "errorMessage": "x",
      "stackTrace": []}, True),
    ({"status": "ok", "body": "1", "run": "nan"}, False),
    ({"status": "ok", "body": "1", "run": "-inf"}, False),
    ({"status": "ok", "body": "1", "run": "-1"}, False),
    ({"status": "too_large", "size": -5}, False),
    ({"status": "ok", "body": "1", "size": "x"}, False),
    ({"status": "ok", "body": "1", "errorType": 5}, False),
    ({"status": "ok", "body": "1", "errorMessage": 7}, False),
    # Named as the runtime names the call's answer: still not after the first call.
    ({"status": "setup_error", "errorMessage": "disk on fire, call the admins"}, False),
    ({"status": "init_error", "errorType": "Runtime.OutOfMemory", "errorMessage": "x",
      "stackTrace": []}, False),
], ids=["setup_error", "init_error", "nan", "-inf", "negative", "negative-size", "size-text",
        "type-number", "message-number", "setup_error-with-id", "init_error-with-id"])
def test_a_warm_handler_cannot_blame_the_platform_or_forge_timings(worker, msg, no_id):
    name = "blamer-%s" % msg["status"]
    worker.add_function(name, ID_FORGER)
    assert worker.call(name, {})[::2] == (200, "late")
    status, headers, body = worker.call(name, {"msg": msg, "no_id": no_id})
    assert (status, body["errorType"]) == (502, "Runtime.ProtocolError"), body
    assert headers["x-function-error"] == "Unhandled"
    listed = json.loads(worker.request("GET", "/sandboxes")[2])
    assert not [s for s in listed if s["function"] == name]  # destroyed, not left busy


def test_a_forged_answer_over_response_kb_is_502(worker):
    with_config(worker, "bigforger", ID_FORGER, "limits:\n  response_kb: 1\n")
    status, _, body = worker.call("bigforger", {"msg": {"status": "ok",
                                                        "body": '"%s"' % ("x" * 2000)}})
    assert (status, body["errorType"]) == (502, "Runtime.ResponseTooLarge"), body
    assert "2002 bytes" in body["errorMessage"]


def test_server_timing_holds_only_finite_times_within_the_call(worker):
    worker.add_function("timer", ID_FORGER)
    worker.call("timer", {})
    forged = {"msg": {"status": "ok", "body": "1", "run": "1e300"}}
    status, headers, _ = worker.call("timer", forged)
    assert status == 200
    total = None
    for part in headers["server-timing"].split(", "):
        name, duration = part.split(";")[:2]
        value = float(duration[len("dur="):])
        assert 0 <= value < 1e6, part
        total = value if name == "total" else total
    assert "handler;dur=" in headers["server-timing"]
    assert all(float(p.split(";")[1][4:]) <= total + 1 for p in headers["server-timing"].split(", "))


def test_json_nested_as_deep_as_the_worker_accepts_never_kills_the_sandbox(worker):
    worker.add_function("deep", "def handler(event):\n    return 'parsed'\n")
    for depth in range(950, 1001):
        body = ("[" * depth + "]" * depth).encode()
        status, _, reply = worker.call("deep", body=body)
        assert (status, reply) == (200, "parsed") or \
            (status, reply["errorType"]) == (400, "Runtime.UnmarshalError"), (depth, reply)
    listed = json.loads(worker.request("GET", "/sandboxes")[2])
    assert len([s for s in listed if s["function"] == "deep"]) == 1  # one, never lost


def test_a_huge_error_is_clipped_to_under_a_mib(worker):
    worker.add_function("bigerror", "def handler(event):\n"
                                    "    raise ValueError('\\x01' * 6_900_000)\n")
    status, _, data = worker.request("POST", "/run/bigerror", b"{}")
    assert status == 500 and len(data) < 1 << 20, len(data)
    body = json.loads(data)
    assert body["errorMessage"].endswith("more characters)")
    assert body["errorMessage"].startswith("\x01" * 100)


def test_cpu_bound_calls_do_not_hold_back_other_functions_cold_starts(own_worker):
    """Shells for the pool are built at cpu.idle; one that a call waits
    for goes first.  Built at cpu.idle to the end (or at the busy
    sandboxes' own share), the shells got next to no CPU while sandboxes
    spun, and other functions' cold starts waited seconds."""
    w = own_worker()
    w.add_function("hog", "import time\n"
                          "def handler(event):\n"
                          "    end = time.monotonic() + event['seconds']\n"
                          "    while time.monotonic() < end:\n"
                          "        pass\n")
    for i in range(10):
        w.add_function("cold-%d" % i, "def handler(event):\n    return 1\n")
    hogs = 16
    with concurrent.futures.ThreadPoolExecutor(hogs) as pool:
        spinning = [pool.submit(Worker(w.path, w.port).call, "hog", {"seconds": 8})
                    for _ in range(hogs)]
        time.sleep(1.5)  # all spinning, the pool used up
        took = []
        for i in range(10):
            start = time.monotonic()
            assert w.call("cold-%d" % i, {})[0] == 200
            took.append(time.monotonic() - start)
        assert all(f.result()[0] == 200 for f in spinning)
        # ...and no function runs with the share its shell was built at.
        for sandbox in json.loads(w.request("GET", "/sandboxes")[2]):
            assert cpu_share_files(sandbox["pid"]) == {"cpu.idle": 0, "weight": "normal"}
    print("cold starts beside %d spinning sandboxes: %s" % (hogs, sorted(round(t, 3) for t in took)))
    # With the shells built at cpu.idle: 0.4 to 4 s for half of them.
    assert sorted(took)[8] < 0.5, took  # one may meet a stall of the host


def cpu_share_files(pid):
    """What the cpu controller's files of `pid`'s cgroup say."""
    from sandbox.cgroups import Cgroup
    with open("/proc/%d/cgroup" % pid) as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    cgroup = Cgroup("/")
    v2 = cgroup.mode.name == "v2"
    path = next(p for _, controllers, p in lines
                if (controllers == "" if v2 else "cpu" in controllers.split(",")))
    d = Cgroup(path).limit_dirs()["cpu"]
    name, normal = ("cpu.weight", 100) if v2 else ("cpu.shares", 1024)
    with open(os.path.join(d, name)) as f:
        weight = "normal" if int(f.read()) == normal else "other"
    with open(os.path.join(d, "cpu.idle")) as f:
        return {"cpu.idle": int(f.read()), "weight": weight}


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_flood_of_short_lines_is_dropped_in_the_kernel_and_counted_as_written(worker):
    worker.add_function("shortlines", "import sys, time\n"
                                      "def handler(event):\n"
                                      "    if not event.get('flood'):\n"
                                      "        print('after')\n"
                                      "        return 0\n"
                                      "    written, end = 0, time.monotonic() + 3\n"
                                      "    while time.monotonic() < end:\n"
                                      "        sys.stdout.write('x\\n' * 1000)\n"
                                      "        written += 2000\n"
                                      "    sys.stdout.flush()\n"
                                      "    return written\n")
    with open(os.path.join(worker.path, "workers", str(worker.port), "pid")) as f:
        pid = int(f.read())
    before = _cpu_seconds(pid)
    status, _, written = worker.call("shortlines", {"flood": True})
    used = _cpu_seconds(pid) - before
    assert status == 200 and written > 20 << 20
    # Read and split in Python, it took the worker 88% of a CPU.
    assert used < 0.3 * 3, used
    time.sleep(1.0)  # the budget earns room for a line
    assert worker.call("shortlines", {})[0] == 200
    time.sleep(0.5)
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    with open(log, "rb") as f:
        mine = [line.split(b"] ", 1)[1] for line in f if line.startswith(b"[shortlines sb-")]
    logged = 2 * mine.count(b"x\n")
    counts = [int(line[1:].split()[0]) for line in mine if line.endswith(b" bytes of output were dropped]\n")]
    assert mine[-1] == b"after\n" and counts, mine[-3:]  # heard again, once it had room
    # What it wrote: logged, or counted as dropped (its prefixes are not).
    assert sum(counts) + logged == written, (counts, logged, written)
