"""The HTTP contract: routes, status codes, error bodies, warm reuse and code
reload, against a real worker; the HTTP layer's deadlines against a server
in this process."""
import asyncio
import concurrent.futures
import contextlib
import gc
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import weakref

import pytest
import uvloop

from conftest import Worker
from worker.heap import GiveBack
from worker.http import HttpProtocol, Response


def sandboxes(worker, function):
    _, _, body = worker.request("GET", "/sandboxes")
    return [s for s in json.loads(body) if s["function"] == function]


def test_status_is_ready(worker):
    status, headers, body = worker.request("GET", "/status")
    assert (status, body) == (200, b"ready")
    assert headers["x-request-id"]
    assert set(timing(headers)) == {"total", "worker"}  # every answer is timed
    status, headers, _ = worker.request("GET", "/nowhere")
    assert status == 404 and set(timing(headers)) == {"total", "worker"}
    status, headers, _ = worker.request("POST", "/status")
    assert status == 405 and headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("prefix", ["/run/", "/runLambda/"])
def test_hello_on_both_paths(worker, prefix):
    status, headers, body = worker.call("hello", {"name": "Alice"}, prefix=prefix)
    assert (status, body) == (200, "Hello, Alice!")
    assert headers["content-type"] == "application/json"
    assert len(headers["x-request-id"]) >= 16


def test_f_py_layout_and_context_argument(worker):
    worker.add_function("fpy", "def f(event):\n    return {'got': event}\n", entry="f.py")
    assert worker.call("fpy", {"a": [1, 2]})[::2] == (200, {"got": {"a": [1, 2]}})
    worker.add_function("ctx", "import time\n"
                               "def handler(event, context):\n"
                               "    before = context.get_remaining_time_in_millis()\n"
                               "    time.sleep(0.2)\n"
                               "    after = context.get_remaining_time_in_millis()\n"
                               "    return [context.function_name, context.aws_request_id,\n"
                               "            before, before - after]\n")
    status, headers, body = worker.call("ctx", {})
    assert status == 200 and body[:2] == ["ctx", headers["x-request-id"]]
    before, slept = body[2:]
    assert 29_000 < before <= 30_000 and 190 <= slept < 1000, body  # runtime_sec is 30


def test_remaining_time_on_a_cold_start_counts_the_loading(worker):
    """The worker's clock for a cold start's call starts when it gives the
    code, so the function's loading is in it: so is the context's."""
    worker.add_function("slowload", "import time\n"
                                    "time.sleep(0.5)\n"
                                    "def handler(event, context):\n"
                                    "    return context.get_remaining_time_in_millis()\n")
    status, _, left = worker.call("slowload", {})
    assert status == 200 and 28_000 < left <= 29_500, left  # runtime_sec is 30
    status, _, left = worker.call("slowload", {})  # warm: the whole of it
    assert status == 200 and left > 29_800, left


def test_a_functions_own_module_wins_over_a_preimported_one(worker):
    """In plain Python a uuid.py next to the script is what `import uuid`
    gets; the zygote has the standard uuid imported, and must not get in
    the way.  Modules a plain interpreter imports at start (os) stay."""
    d = worker.add_function("shadow", "import email.mine, os, sys, uuid\n"
                                      "def handler(event):\n"
                                      "    return [uuid.WHO, email.mine.WHO, hasattr(os, 'getpid'),\n"
                                      "            sys.path[0], '/' in sys.path]\n")
    worker.add_function("shadow", "WHO = 'my uuid'\n", entry="uuid.py")
    os.makedirs(os.path.join(d, "email"))
    with open(os.path.join(d, "email", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(d, "email", "mine.py"), "w") as f:
        f.write("WHO = 'my email'\n")
    assert worker.call("shadow", {})[::2] == (200, ["my uuid", "my email", True, "/handler",
                                                    False])


def test_a_data_directory_named_like_a_package_hides_nothing(worker):
    """A directory without __init__.py is no package of the function's: as
    in plain Python, the standard one of that name is imported."""
    d = worker.add_function("datadir", "import email\n"
                                       "def handler(event):\n"
                                       "    return email.__file__\n")
    os.makedirs(os.path.join(d, "email"))
    with open(os.path.join(d, "email", "notes.txt"), "w") as f:
        f.write("data\n")
    status, _, where = worker.call("datadir", {})
    assert status == 200 and where.startswith("/usr/lib/python3"), where


def test_a_directory_its_user_cannot_list_still_loads(worker):
    d = worker.add_function("unlisted", "def handler(event):\n    return 'loaded'\n")
    os.chmod(d, 0o711)
    assert worker.call("unlisted", {})[::2] == (200, "loaded")


def test_a_function_at_its_concurrency_gets_429_and_others_do_not(worker):
    worker.add_function("single", "import time\n"
                                  "def handler(event):\n"
                                  "    time.sleep(event['s'])\n"
                                  "    return 'slept'\n")
    worker.add_function("single", "limits:\n  concurrency: 1\n", entry="ol.yaml")
    other = Worker(worker.path, worker.port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(other.call, "single", {"s": 1.5})
        time.sleep(0.5)
        status, headers, body = worker.call("single", {"s": 0})
        assert (status, body["errorType"]) == (429, "Worker.TooManyRequests"), body
        assert "limits.concurrency" in body["errorMessage"] and headers["retry-after"] == "1"
        assert worker.call("hello", {"name": "x"})[::2] == (200, "Hello, x!")
        assert first.result()[::2] == (200, "slept")
    assert worker.call("single", {"s": 0})[::2] == (200, "slept")  # its one sandbox, free again


def test_an_async_handler_is_run_to_its_end(worker):
    worker.add_function("asyncfn", "import asyncio\n"
                                   "async def handler(event):\n"
                                   "    await asyncio.sleep(0.01)\n"
                                   "    return 'awaited'\n")
    assert worker.call("asyncfn", {})[::2] == (200, "awaited")


def test_a_keyboard_interrupt_raised_by_the_function_is_its_error(worker):
    worker.add_function("kbd", "def handler(event):\n"
                               "    raise KeyboardInterrupt('from the function')\n")
    for _ in range(2):  # the same sandbox answers again
        status, headers, body = worker.call("kbd", {})
        assert (status, body["errorType"]) == (500, "KeyboardInterrupt"), body
        assert body["errorMessage"] == "from the function"
    listed = json.loads(worker.request("GET", "/sandboxes")[2])
    assert len([s for s in listed if s["function"] == "kbd"]) == 1


def test_empty_body_is_an_empty_event(worker):
    status, _, data = worker.request("POST", "/run/probe", b"")
    assert status == 500  # probe needs event["op"]: the handler saw {}
    assert json.loads(data)["errorType"] == "KeyError"


def test_warm_call_reuses_the_live_handler(worker):
    worker.call("probe", {"op": "echo"})
    first = sandboxes(worker, "probe")
    for _ in range(5):
        assert worker.call("probe", {"op": "echo", "n": 1})[0] == 200
    assert [s["id"] for s in sandboxes(worker, "probe")] == [s["id"] for s in first]


def test_unknown_function_is_404(worker):
    status, headers, body = worker.call("no-such-function", {})
    assert status == 404 and body["errorType"] == "Function.NotFound"
    assert body["requestId"] == headers["x-request-id"]


def test_a_broken_symbolic_link_in_the_registry_says_what_it_is(worker):
    dangling, loop = os.path.join(worker.registry, "dang"), os.path.join(worker.registry, "loop1")
    os.symlink("/nonexistent", dangling)
    os.symlink("loop2", loop)
    os.symlink("loop1", os.path.join(worker.registry, "loop2"))
    try:
        status, _, body = worker.call("dang", {})
        assert status == 404 and body["errorMessage"] == (
            "function 'dang' is a symbolic link to '/nonexistent', which is no directory")
        status, _, body = worker.call("loop1", {})
        assert status == 500 and body["errorType"] == "Runtime.ConfigError", body
        assert body["errorMessage"] == ("function 'loop1': its directory cannot be read: "
                                        "Too many levels of symbolic links")
    finally:
        for name in ("dang", "loop1", "loop2"):
            os.unlink(os.path.join(worker.registry, name))
    assert worker.call("hello", {"name": "L"})[::2] == (200, "Hello, L!")


@pytest.mark.parametrize("name", ["..", ".hidden", "-dash", "a%2Fb", "%2e%2e", "%2E%2E%2Fetc",
                                  "x" * 129])
def test_bad_function_names_are_404_saying_so(worker, name):
    there = os.path.join(worker.registry, "-dash")  # a directory, but not a name
    os.makedirs(there)
    try:
        status, _, body = worker.call(name, {})
    finally:
        os.rmdir(there)
    assert status == 404 and "is not a function name" in body["errorMessage"]


def test_a_percent_encoded_name_is_decoded(worker):
    assert worker.call("hel%6Co", {"name": "P"})[::2] == (200, "Hello, P!")


def test_unknown_route_is_404_and_get_on_run_is_405(worker):
    status, _, body = worker.request("GET", "/nowhere")
    assert status == 404 and json.loads(body)["errorType"] == "Http.NotFound"
    status, headers, body = worker.request("GET", "/run/hello")
    assert status == 405 and headers["allow"] == "POST"


def test_an_absolute_form_target_is_routed_by_its_path(worker):
    assert worker.request("GET", "http://localhost:%d/status" % worker.port)[::2] == (
        200, b"ready")
    assert worker.call("hello", {"name": "abs"}, prefix="http://x/run/")[::2] == (
        200, "Hello, abs!")


@pytest.mark.parametrize("body", [b'{"name": ', b'{"name": NaN}', b'[-Infinity]',
                                  b'"\xff"', b"[" * 100_000 + b"]" * 100_000])
def test_malformed_json_is_400_unmarshal_error(worker, body):
    status, _, answer = worker.call("hello", body=body)
    assert status == 400 and answer["errorType"] == "Runtime.UnmarshalError", answer


def test_handler_exception_is_500_with_its_type_message_and_stack(worker):
    status, headers, body = worker.call("probe", {"op": "raise", "message": "kaboom"})
    assert status == 500
    assert headers["x-function-error"] == "Unhandled"
    assert set(body) == {"errorType", "errorMessage", "stackTrace", "requestId"}
    assert body["errorType"] == "RuntimeError" and body["errorMessage"] == "kaboom"
    assert any("lambda_func.py" in frame for frame in body["stackTrace"])
    assert body["requestId"] == headers["x-request-id"]
    assert worker.call("probe", {"op": "echo"})[0] == 200  # the instance still serves


@pytest.mark.parametrize("event", [{"op": "unjsonable"}, {"op": "float", "value": "nan"},
                                   {"op": "float", "value": "-inf"}])
def test_unserialisable_result_is_a_marshal_error(worker, event):
    status, _, body = worker.call("probe", event)
    assert status == 500 and body["errorType"] == "Runtime.MarshalError", body


@pytest.mark.parametrize("op,code,expect", [("exit", 3, "exited with status 3"),
                                            ("sys.exit", 4, "exited with status 4"),
                                            ("sys.exit", None, "exited with status 0"),
                                            ("sys.exit", "bye", "exited with status 1"),
                                            ("segv", None, "killed by signal 11 (SIGSEGV)")])
def test_dead_handler_is_502_with_exit_status_and_next_call_works(worker, op, code, expect):
    status, headers, body = worker.call("probe", {"op": op, "code": code})
    assert status == 502
    assert body["errorType"] == "Runtime.ExitError"
    assert expect in body["errorMessage"]
    assert worker.call("probe", {"op": "echo", "after": op})[::2] == (
        200, {"op": "echo", "after": op})


def test_missing_entry_file_is_500_saying_so(worker):
    worker.add_function("noentry", "x = 1\n", entry="helper.py")
    status, _, body = worker.call("noentry", {})
    assert status == 500 and body["errorType"] == "Runtime.HandlerNotFound"
    assert "lambda_func.py" in body["errorMessage"] and "f.py" in body["errorMessage"]


def test_syntax_error_is_500_saying_so(worker):
    worker.add_function("broken", "def handler(event)\n    return 1\n")
    status, _, body = worker.call("broken", {})
    assert status == 500 and body["errorType"] == "Runtime.UserCodeSyntaxError", body
    assert "line 1" in body["errorMessage"], body
    assert not sandboxes(worker, "broken"), sandboxes(worker, "broken")  # it is gone


def test_import_error_and_missing_handler_are_500(worker):
    worker.add_function("badimport", "import no_such_module\n")
    status, _, body = worker.call("badimport", {})
    assert status == 500 and body["errorType"] == "Runtime.ImportModuleError"
    assert "no_such_module" in body["errorMessage"]
    worker.add_function("nohandler", "def other(event):\n    return 1\n")
    status, _, body = worker.call("nohandler", {})
    assert status == 500 and body["errorType"] == "Runtime.HandlerNotFound"


def test_code_change_is_picked_up_by_the_next_call(worker):
    worker.add_function("reload", "def handler(event):\n    return 'v1'\n")
    assert worker.call("reload", {})[2] == "v1"
    assert worker.call("reload", {})[2] == "v1"
    worker.add_function("reload", "def handler(event):\n    return 'v2'\n")
    assert worker.call("reload", {})[2] == "v2"
    # A helper module in a subdirectory counts too.
    d = worker.add_function("reload", "from lib.helper import value\n"
                                      "def handler(event):\n    return value\n")
    os.makedirs(os.path.join(d, "lib"), exist_ok=True)
    with open(os.path.join(d, "lib", "helper.py"), "w") as f:
        f.write("value = 'v3'\n")
    assert worker.call("reload", {})[2] == "v3"
    with open(os.path.join(d, "lib", "helper.py"), "w") as f:
        f.write("value = 'v4'\n")
    assert worker.call("reload", {})[2] == "v4"
    assert len(sandboxes(worker, "reload")) == 1  # old instances were retired


def test_edits_of_a_function_frozen_while_idle_keep_being_served(own_worker):
    """Each edit retires the function's idle sandbox, which the worker had
    frozen by then; its cgroup goes back to the pool, and more edits than
    the pool holds shells reuse every one.  A cgroup handed on frozen would
    stall the pool, and every cold start after it."""
    worker = own_worker(pool_size=2)
    for version in range(6):
        worker.add_function("edited", "def handler(event):\n    return %d\n" % version)
        assert worker.call("edited", {})[::2] == (200, version)
        time.sleep(0.2)  # idle past FREEZE_AFTER: frozen
    assert worker.call("hello", {"name": "B"})[::2] == (200, "Hello, B!")


def test_a_deleted_functions_idle_sandbox_goes_without_another_call(worker):
    d = worker.add_function("deleted", "def handler(event):\n    return 1\n")
    assert worker.call("deleted", {})[::2] == (200, 1)
    assert [s["state"] for s in sandboxes(worker, "deleted")] == ["idle"]
    shutil.rmtree(d)
    deadline = time.monotonic() + 5
    while sandboxes(worker, "deleted") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandboxes(worker, "deleted") == []


def test_code_that_fails_to_load_because_it_changed_meanwhile_is_loaded_again(worker):
    """A file rewritten in place can be read half written, and fail to
    load; if the code changed while it loaded, the call is made once more,
    with the code as it is now."""
    d = worker.add_function("midedit", "import time\n"
                                       "time.sleep(0.6)\n"
                                       "raise ImportError('read half written')\n")
    other = Worker(worker.path, worker.port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(other.call, "midedit", {})
        time.sleep(0.3)  # it is loading the first version
        with open(os.path.join(d, "lambda_func.py.new"), "w") as f:
            f.write("def handler(event):\n    return 'whole'\n")
        os.rename(os.path.join(d, "lambda_func.py.new"), os.path.join(d, "lambda_func.py"))
        assert call.result()[::2] == (200, "whole")


def test_replaced_function_directory_is_picked_up(worker):
    d = worker.add_function("replaced", "def handler(event):\n    return 'old'\n")
    assert worker.call("replaced", {})[2] == "old"
    shutil.rmtree(d)
    assert worker.call("replaced", {})[0] == 404
    worker.add_function("replaced", "def handler(event):\n    return 'new'\n")
    assert worker.call("replaced", {})[2] == "new"


@pytest.mark.parametrize("size", [10, (32 << 10) - 40, 32 << 10, 200 << 10])
def test_a_cold_start_gets_its_request_whole_at_any_size(worker, size):
    # Up to FIRST_MESSAGE_MAX, the request goes with the code; above, after.
    name = "echo-len-%d" % size
    worker.add_function(name, "def handler(event):\n    return [len(event), event[:3]]\n")
    status, _, body = worker.call(name, "abc" + "x" * (size - 3))
    assert status == 200 and body == [size, "abc"]


@pytest.mark.parametrize("size", [10, 64 << 10, 3 << 20])
def test_a_reply_arrives_whole_at_any_size_and_the_next_call_too(worker, size):
    # The worker reads every channel into one shared buffer, a piece at a
    # time: a reply larger than it, or than the unpacker's first buffer,
    # must come out whole, and the next call's reply not mixed with it.
    name = "reply-len-%d" % size
    worker.add_function(name, "def handler(event):\n    return event['c'] * event['n']\n")
    for c in "ab":
        status, _, body = worker.call(name, {"c": c, "n": size})
        assert status == 200 and body == c * size


def test_body_over_the_limit_is_413_before_it_is_read(worker):
    big = b'"' + b"x" * (7 << 20) + b'"'
    status, headers, body = worker.request("POST", "/run/hello", big)
    assert status == 413 and json.loads(body)["errorType"] == "Http.RequestTooLarge"
    assert json.loads(body)["requestId"] == headers["x-request-id"]
    # Announced length alone is enough: answered without sending the body.
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_malformed_http_is_400(worker):
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_keep_alive_serves_many_requests_on_one_connection(worker):
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(10)
        for i in range(3):
            body = json.dumps({"name": str(i)}).encode()
            s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            data = b""
            while not data.endswith(b'!"'):
                data += s.recv(4096)
            assert b"200 OK" in data and ("Hello, %d!" % i).encode() in data


def test_concurrent_calls_to_one_function_scale_out(worker):
    def call(_):
        c = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=30)
        c.request("POST", "/run/probe", json.dumps({"op": "sleep", "seconds": 0.3}))
        r = c.getresponse()
        body = json.loads(r.read())
        c.close()
        return r.status, body

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert [status for status, _ in results] == [200] * 4
    # A busy instance is not shared: the overlapping calls ran in 4 sandboxes.
    assert len({host for _, host in results}) == 4


def timing(headers):
    return {part.split(";")[0].strip(): part for part in headers["server-timing"].split(",")}


def test_server_timing_shows_the_phases_of_a_cold_and_a_warm_call(worker):
    worker.add_function("timed", "def handler(event):\n    return 1\n")
    _, headers, _ = worker.call("timed", {})
    cold = timing(headers)
    for phase in ("total", "worker", "wait", "fork", "cgroup", "mounts", "wake", "attach", "drop",
                  "load", "handler", "ipc"):
        assert phase in cold, headers["server-timing"]
    assert 'desc="before the request"' in cold["fork"]  # a pooled shell
    _, headers, _ = worker.call("timed", {})
    warm = timing(headers)
    assert set(warm) == {"total", "worker", "handler", "ipc"}
    status, headers, _ = worker.call("probe", {"op": "raise"})
    assert status == 500 and "handler" in timing(headers)  # errors are timed too


def test_many_cold_starts_in_a_row_drain_and_refill_the_pool(worker):
    for i in range(20):
        worker.add_function("burst%d" % i, "def handler(event):\n    return %d\n" % i)
    assert [worker.call("burst%d" % i, {})[2] for i in range(20)] == list(range(20))


def test_unreadable_code_is_500_saying_why(worker):
    d = worker.add_function("private", "def handler(event):\n    return 1\n")
    os.chmod(d, 0o700)  # the handler runs as nobody: it cannot read this
    status, _, body = worker.call("private", {})
    assert status == 500 and body["errorType"] == "Runtime.PermissionDenied", body
    assert "chmod" in body["errorMessage"]
    os.chmod(d, 0o755)
    assert worker.call("private", {})[::2] == (200, 1)  # chmod is a change: reloaded


def test_handler_output_goes_to_the_log_with_its_function_and_sandbox(worker):
    worker.add_function("talker", "import sys\n"
                                  "def handler(event):\n"
                                  "    print('said', event['word'])\n"
                                  "    print('warned', file=sys.stderr)\n"
                                  "    return 1\n")
    worker.call("talker", {"word": "xyzzy"})
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = open(log).read().splitlines()
        said = [line for line in lines if "said xyzzy" in line]
        if said and [line for line in lines if "warned" in line]:
            break
        time.sleep(0.02)
    assert said and said[0].startswith("[talker sb-"), said


def test_handler_output_cannot_forge_log_lines(worker):
    """A carriage return or a terminal escape in a handler's output would
    let it overwrite or hide lines for a reader at a terminal: they are
    escaped, and the line stays its function's."""
    worker.add_function("forger", "import sys\n"
                                  "def handler(event):\n"
                                  "    print('plugh\\rworker: all good\\x1b[2K\\x1b[31m', flush=True)\n"
                                  "    print('grault\\u009b2K \\u202eexe.txt \\u2603 \\u2028', flush=True)\n"
                                  "    sys.stdout.buffer.write(b'frotz\\x9b2K\\n')\n"
                                  "    sys.stdout.flush()\n"
                                  "    return 1\n")
    worker.call("forger", {})
    log = os.path.join(worker.path, "logs", "worker-%d.log" % worker.port)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            lines = [line for line in f.read().split(b"\n")
                     if any(word in line for word in (b"plugh", b"grault", b"frotz"))]
        if len(lines) == 3:
            break
        time.sleep(0.02)
    assert len(lines) == 3 and all(line.startswith(b"[forger sb-") for line in lines), lines
    assert lines[0].endswith(b"plugh\\x0dworker: all good\\x1b[2K\\x1b[31m"), lines
    # 8-bit controls, text reordering, and bytes that are not UTF-8 too.
    assert lines[1].endswith("grault\\x9b2K \\u202eexe.txt \u2603 \\u2028".encode()), lines
    assert lines[2].endswith(b"frotz\\x9b2K"), lines


def test_handler_cannot_read_the_worker_log_or_other_fds(worker):
    _, _, facts = worker.call("probe", {"op": "facts"})
    assert facts["fds"][:4] == [0, 1, 2, facts["fds"][3]] and len(facts["fds"]) <= 5
    _, _, r = worker.call("probe", {"op": "read", "path": "/proc/self/fd/1"})
    assert r["ok"] is False or "worker[" not in r["value"]  # its own pipe, not the log


def test_devices_work_and_ptys_are_private(worker):
    _, _, r = worker.call("probe", {"op": "read", "path": "/dev/null"})
    assert r == {"ok": True, "value": ""}
    _, _, r = worker.call("probe", {"op": "write", "path": "/dev/null", "data": "x"})
    assert r["ok"] is True
    _, _, r = worker.call("probe", {"op": "listdir", "path": "/dev/pts"})
    assert r["ok"] is True and set(r["value"]) <= {"ptmx"}  # no other sandbox's ptys


def test_pipelined_requests_are_answered_in_order(worker):
    requests = b""
    for i in range(4):
        body = json.dumps({"name": str(i)}).encode()
        requests += b"POST /run/hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)
    requests += b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(10)
        s.sendall(requests)
        data = b""
        while not data.endswith(b"ready"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    answers = [data.find(b"Hello, %d!" % i) for i in range(4)] + [data.find(b"ready")]
    assert -1 not in answers and answers == sorted(answers)


def test_upgrade_requests_are_answered_as_http_1_1_then_closed(worker):
    # curl --http2 against http:// asks for an h2c upgrade: it must get a
    # normal answer, not a dropped connection.
    body = b'{"name": "h2c"}'
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(5)
        s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'"Hello, h2c!"')


def test_idle_sandboxes_are_frozen_so_leftover_threads_stop(worker):
    worker.add_function("ticker", "import threading, time\n"
                                  "ticks = [0]\n"
                                  "def tick():\n"
                                  "    while True:\n"
                                  "        ticks[0] += 1\n"
                                  "        time.sleep(0.01)\n"
                                  "def handler(event):\n"
                                  "    if event.get('start'):\n"
                                  "        threading.Thread(target=tick, daemon=True).start()\n"
                                  "    return ticks[0]\n")
    worker.call("ticker", {"start": True})
    first = worker.call("ticker", {})[2]
    time.sleep(1.0)  # awake, the thread would tick about 100 times
    second = worker.call("ticker", {})[2]
    assert second - first < 40, (first, second)
    time.sleep(0.05)  # thawed for the call: it runs while the sandbox is taken
    assert worker.call("ticker", {})[2] > second


def read_to_close(s):
    """All the server sends until it closes the connection."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def parse_answer(data):
    """(status, headers, rest): rest is the body and whatever follows it."""
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v) for k, v in (line.split(": ", 1) for line in lines[1:]))
    return int(lines[0].split()[1]), headers, rest


def raw_exchange(port, data, timeout=10):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(timeout)
        s.sendall(data)
        return read_to_close(s)


@pytest.mark.parametrize("path,status", [("/status", 200), ("/run/hello", 405),
                                         ("/nowhere", 404)])
def test_head_is_answered_like_get_without_a_body(worker, path, status):
    # A GET pipelined behind it must start right after the head of the first
    # answer: one body byte sent for the HEAD would put the client out of step.
    data = raw_exchange(worker.port, b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        % path.encode())
    got, headers, rest = parse_answer(data)
    assert got == status and rest.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert parse_answer(rest)[2] == b"ready"
    _, get_headers, get_body = worker.request("GET", path)
    assert int(headers["content-length"]) == len(get_body)
    assert headers["content-type"] == get_headers["content-type"]
    if status == 405:
        assert headers["allow"] == "POST"


@pytest.mark.parametrize("request_head,status,message", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "request target exceeds 8192 bytes"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
     + b"\r\n", 431, "request headers exceed 16384 bytes"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
     431, "more than 100 request headers"),
    # One header that never ends: refused while it arrives, not once it is whole.
    (b"GET / HTTP/1.1\r\nX: " + b"v" * (1 << 20), 431, "request headers exceed 16384 bytes"),
])
def test_oversized_request_heads_are_refused_and_closed(worker, request_head, status, message):
    got, headers, body = parse_answer(raw_exchange(worker.port, request_head))
    assert (got, headers["connection"]) == (status, "close")
    error = json.loads(body)  # the whole body: the connection was closed after it
    assert error["errorMessage"] == message
    assert error["errorType"] == {414: "Http.UriTooLong", 431: "Http.HeadersTooLarge"}[status]
    assert error["requestId"] == headers["x-request-id"]


@pytest.mark.parametrize("framing,fault", [
    (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
     "Transfer-Encoding can't be present with Content-Length"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
     "Content-Length can't be present with Transfer-Encoding"),
    (b"Content-Length: 3x\r\n", "Invalid character in Content-Length"),
    (b"Content-Length: -3\r\n", "Invalid character in Content-Length"),
    (b"Content-Length: 3\r\nContent-Length: 4\r\n", "Duplicate Content-Length"),
])
def test_ambiguous_body_framing_is_400_and_closed(worker, framing, fault):
    got, _, body = parse_answer(raw_exchange(
        worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n{}\r\n"))
    assert got == 400
    assert json.loads(body)["errorMessage"] == "malformed HTTP request: " + fault


def test_expect_100_continue_behind_pipelined_answers_comes_once_they_have_gone(worker):
    # 40 answers made at once: more than a turn of the loop gives one connection.
    body = b'{"name": "later"}'
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 40 +
                  b"POST /run/hello HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        seen = b""
        while b"HTTP/1.1 100 Continue\r\n\r\n" not in seen:
            seen += s.recv(65536)  # a timeout here: the 100 never came
        assert seen.count(b"HTTP/1.1 200 OK\r\n") == 40  # after the answers before it
        s.sendall(body)
        rest = seen.split(b"HTTP/1.1 100 Continue\r\n\r\n", 1)[1] + read_to_close(s)
    assert parse_answer(rest)[::2] == (200, b'"Hello, later!"')


def test_expect_100_continue_is_honoured_and_others_are_417(worker):
    body = b'{"name": "patient"}'
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(10)
        s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        got, _, answer = parse_answer(read_to_close(s))
    assert (got, answer) == (200, b'"Hello, patient!"')
    got, headers, answer = parse_answer(raw_exchange(
        worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\nExpect: x-magic\r\n"
                     b"Content-Length: 2\r\n\r\n{}"))
    assert (got, headers["connection"]) == (417, "close")
    assert json.loads(answer)["errorMessage"] == (
        "unsupported Expect: x-magic (only 100-continue is supported)")


# The deadlines are tested on a server in this process, with short ones.
class StubApp:
    """Answers at once with the method and path, except /slow, after SLOW s."""
    max_body = 1024
    max_connections = 3
    SLOW = 1.2

    def __init__(self):
        self.connections = 0
        self.unread = set()
        self.bodies = 0
        self.uploading = set()
        self.shedding = None
        self.give_back = GiveBack()

    def handle_now(self, request):
        if request.path == "/slow":
            return None
        if request.path == "/big":
            return Response(200, b"x" * (256 << 10), b"text/plain")
        if request.path in ("/large", "/huge"):
            size = 4 << 20 if request.path == "/large" else 16 << 20
            return Response(200, b"x" * size, b"text/plain")
        return Response(200, ("%s %s" % (request.method, request.path)).encode(), b"text/plain")

    async def handle(self, request):
        await asyncio.sleep(self.SLOW)
        return Response(200, b"slow", b"text/plain")


@pytest.fixture
def local_server():
    """(port, the connections' protocols) of an HttpProtocol server on a
    thread: deadlines of 1 s idle, 0.5 s for a head and for a body."""
    loop = uvloop.new_event_loop()
    protocols = []
    app = StubApp()

    def protocol():
        protocols.append(HttpProtocol(app, idle_timeout=1, header_timeout=0.5,
                                      body_timeout=0.5))
        return protocols[-1]
    server = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    yield server.sockets[0].getsockname()[1], protocols
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    server.close()
    loop.close()


@pytest.fixture
def local_port(local_server):
    return local_server[0]


@contextlib.contextmanager
def unread_answers(local_server):
    """A client that asked for 100 answers of 256 KiB each and reads none:
    yields (its socket, the server's protocol for it, now paused)."""
    port, protocols = local_server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        time.sleep(0.5)
        (protocol,) = protocols
        assert protocol.write_paused
        yield s, protocol


def test_a_client_that_does_not_read_does_not_make_the_server_buffer(local_server):
    with unread_answers(local_server) as (s, protocol):
        assert protocol.transport.get_write_buffer_size() < 2 << 20
        # Reading drains it, and every answer comes, in order.
        s.settimeout(5)
        got = 0
        while got < 100 * (256 << 10):
            chunk = s.recv(1 << 20)
            assert chunk
            got += chunk.count(b"x")


def test_too_many_unread_answers_cut_off_their_stalled_clients_or_refuse_the_call(
        local_port, monkeypatch):
    monkeypatch.setattr("worker.http.UNREAD_MAX", 1 << 20)

    def call():
        with socket.create_connection(("127.0.0.1", local_port), timeout=5) as s:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return parse_answer(read_to_close(s))

    with socket.create_connection(("127.0.0.1", local_port), timeout=5) as hog:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sendall(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")  # 16 MiB, never read
        time.sleep(0.3)
        status, headers, rest = call()  # the hog stalled only just now: it is kept
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(rest)["errorType"] == "Worker.Unavailable"
        assert "do not read" in json.loads(rest)["errorMessage"]
        time.sleep(1.0)
        assert call()[0] == 200  # stalled for over UNREAD_GRACE: the hog is cut off
        with pytest.raises(ConnectionResetError):
            while hog.recv(1 << 20):
                pass


def test_clients_that_do_not_read_are_cut_off_without_waiting_for_a_new_call(
        local_server, monkeypatch):
    """Answers of calls already under way can pile up with no call after
    them to check the budget (150 of 6 MiB took the worker past a GB)."""
    monkeypatch.setattr("worker.http.UNREAD_MAX", 1 << 20)
    port, protocols = local_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as hog:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        time.sleep(0.1)
        protocols[-1].idle_timeout = 60  # not cut off as idle: the budget's doing
        hog.sendall(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")  # 16 MiB, never read
        time.sleep(2.5)  # UNREAD_GRACE, and the shedding's own second
        with pytest.raises(ConnectionResetError):
            while hog.recv(1 << 20):
                pass


def test_a_connection_over_the_cap_is_answered_503_and_a_closed_one_frees_its_place(
        local_port):
    def served(s):
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(4096).endswith(b"\r\n\r\nGET /a")

    held = [socket.create_connection(("127.0.0.1", local_port), timeout=5)
            for _ in range(StubApp.max_connections)]
    try:
        assert all(served(s) for s in held)
        with socket.create_connection(("127.0.0.1", local_port), timeout=5) as extra:
            status, headers, rest = parse_answer(read_to_close(extra))
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(rest)["errorType"] == "Http.TooManyConnections"
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the close soon after
            with socket.create_connection(("127.0.0.1", local_port), timeout=5) as s:
                try:
                    if served(s):
                        break
                except ConnectionError:
                    pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()


def test_a_worker_keeps_fds_for_its_sandboxes_whatever_its_connections(own_worker):
    w = own_worker(max_connections=2)
    first = http.client.HTTPConnection("127.0.0.1", w.port, timeout=30)
    try:
        first.request("GET", "/status")
        assert first.getresponse().read() == b"ready"
        w.request("GET", "/status")  # the second, kept open by the test's client
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as third:
            status, _, rest = parse_answer(read_to_close(third))
        assert status == 503 and json.loads(rest)["errorType"] == "Http.TooManyConnections"
        status, _, body = w.call("hello", {"name": "still"})  # a cold start
        assert status == 200
    finally:
        first.close()


@pytest.mark.parametrize("ask", [b"GET /huge HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                 b"GET /huge HTTP/1.0\r\n\r\n"])
def test_a_client_that_does_not_read_its_last_answer_loses_its_connection(local_server, ask):
    # The answer ends the connection, but cannot all be sent: the
    # connection, and its place among max_connections, would be held for
    # as long as the client likes.  It is cut off after the idle timeout.
    port, protocols = local_server
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(ask)
        deadline = time.monotonic() + 10
        while not protocols or protocols[0].app.connections:
            assert time.monotonic() < deadline, "still open"
            time.sleep(0.05)


@pytest.mark.parametrize("ask", [b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n",
                                 b"GET /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_answer(local_port, ask):
    # Three idle timeouts' worth of slow reading, then the rest at once.
    # The kernel's send queue takes megabytes: the worker's own buffer of
    # answers shrinks only long after the client has started reading.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", local_port))
        s.settimeout(5)
        s.sendall(ask)
        got = b""
        slow_until = time.monotonic() + 3
        while time.monotonic() < slow_until:
            got += s.recv(16 << 10)
            time.sleep(0.1)
        while got.count(b"x") < 4 << 20:
            chunk = s.recv(1 << 20)
            assert chunk, "cut off after %d bytes" % len(got)
            got += chunk


def test_idle_keep_alive_connection_is_closed_quietly(local_port):
    with socket.create_connection(("127.0.0.1", local_port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).endswith(b"\r\n\r\nGET /a")
        started = time.monotonic()
        assert read_to_close(s) == b""
        assert 0.9 < time.monotonic() - started < 3


def test_slowloris_head_gets_408_at_its_deadline(local_port):
    with socket.create_connection(("127.0.0.1", local_port)) as s:
        s.settimeout(5)
        started = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        for _ in range(10):  # trickling does not move the deadline
            time.sleep(0.1)
            try:
                s.sendall(b"X")
            except ConnectionError:
                break
        got, headers, body = parse_answer(read_to_close(s))
    assert 0.4 < time.monotonic() - started < 3
    assert (got, headers["connection"]) == (408, "close")
    assert json.loads(body)["errorMessage"] == "request headers incomplete after 0.5 s"


def test_stalled_body_gets_408(local_port):
    got, _, body = parse_answer(raw_exchange(
        local_port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"))
    assert got == 408
    assert json.loads(body)["errorMessage"] == "request body incomplete after 0.5 s"


def test_the_body_of_an_upgrade_request_has_the_bodys_deadline(local_port):
    status, headers, body = parse_answer(raw_exchange(
        local_port, b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
                    b"Content-Length: 10\r\n\r\nabc"))
    assert (status, headers["connection"]) == (408, "close")
    assert json.loads(body)["errorMessage"] == "request body incomplete after 0.5 s"


@pytest.mark.parametrize("tail", [b"", b"POST /a"], ids=["plain", "its own request line again"])
def test_a_long_header_is_refused_in_the_segment_that_starts_the_request(local_port, tail):
    # httptools keeps an unfinished header line out of the callbacks' sight;
    # the head's start is found by its request line, which the header's
    # value may copy.
    with socket.create_connection(("127.0.0.1", local_port)) as s:
        s.settimeout(5)
        started = time.monotonic()
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + tail)
        status, headers, body = parse_answer(read_to_close(s))
    assert (status, json.loads(body)["errorType"]) == (431, "Http.HeadersTooLarge")
    assert time.monotonic() - started < 0.4  # at once, not at the head's deadline


def test_no_deadline_runs_while_an_answer_is_made(local_port):
    # /slow takes longer than every deadline; what is pipelined behind it waits.
    data = raw_exchange(local_port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"HEAD /next HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, _, rest = parse_answer(data)
    second, headers, rest = parse_answer(rest[len(b"slow"):])
    assert (first, second, headers["content-length"]) == (200, 200, "9")  # len("GET /next")
    assert parse_answer(rest)[2] == b"GET /last"


def test_an_error_is_answered_after_the_requests_before_it(local_port):
    data = raw_exchange(local_port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP\r\n\r\n")
    first, _, rest = parse_answer(data)
    assert (first, rest[:4]) == (200, b"slow")
    second, _, body = parse_answer(rest[4:])
    assert second == 400
    assert json.loads(body)["errorMessage"].startswith("malformed HTTP request: ")


def test_405_names_the_method_each_route_allows(worker):
    status, headers, _ = worker.request("POST", "/sandboxes")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, _ = worker.request("GET", "/run/hello")
    assert status == 405 and headers["allow"] == "POST"


def test_a_client_that_stops_reading_for_good_is_cut_off(local_server):
    with unread_answers(local_server) as (s, protocol):
        deadline = time.monotonic() + 5  # its idle timeout is 1 s
        while not protocol.transport.is_closing() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert protocol.transport.is_closing()


def test_a_closed_connection_is_freed_without_the_cycle_collector():
    """The worker collects cycles almost never (server.py): whatever a
    connection holds (its body too) must go when it closes."""
    loop = uvloop.new_event_loop()
    app = StubApp()
    alive = []  # weak references to every connection's protocol
    app.max_connections = 100

    def protocol():
        alive.append(weakref.ref(HttpProtocol(app, idle_timeout=1, header_timeout=0.5,
                                              body_timeout=0.5)))
        return alive[-1]()
    server = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever)
    gc.disable()
    try:
        thread.start()
        raw_exchange(port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw_exchange(port, b"NOT HTTP\r\n\r\n")
        for request in (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n" + b"b" * 500,
                        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"):  # the client leaves first
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(request)
                time.sleep(0.1)
        deadline = time.monotonic() + 2 * StubApp.SLOW
        while any(ref() is not None for ref in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(alive) == 4 and [ref() for ref in alive] == [None] * 4
    finally:
        gc.enable()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        server.close()
        loop.close()


FLOOD = """
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def read():
    while s.recv(1 << 20):
        pass
reader = threading.Thread(target=read)
reader.start()
s.sendall(b"GET /status HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" * 200000)
s.shutdown(socket.SHUT_WR)
reader.join()
"""


def test_a_client_pipelining_without_end_does_not_keep_others_waiting(worker):
    """Answers it gets at once (/status) come SERVE_AT_ONCE a turn of the
    loop: a call on another connection is answered while it goes on (it
    waited for all of its 300,000 requests, 6.4 s)."""
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(worker.port)])
    try:
        time.sleep(0.3)  # well into it
        calls = 0
        while flood.poll() is None and calls < 5:  # each on a connection of its own
            status, _, body = parse_answer(raw_exchange(
                worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Content-Length: 2\r\n\r\n{}", timeout=30))
            assert (status, body) == (200, b'"Hello, world!"')
            calls += 1
        assert calls == 5, "the flood ended before the other connection got an answer"
    finally:
        flood.kill()
        flood.wait()


def _rss_mb(w):
    with open(os.path.join(w.path, "workers", str(w.port), "pid")) as f:
        pid = int(f.read())
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmRSS:"))


def test_what_a_burst_of_uploads_took_goes_back_to_the_host_once_they_close(worker):
    before = _rss_mb(worker)
    uploads = []
    try:
        for _ in range(500):  # 60 MB of bodies, none finished
            s = socket.create_connection(("127.0.0.1", worker.port))
            s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 6000000\r\n\r\n"
                      + b" " * 120_000)
            uploads.append(s)
        time.sleep(1)
        held = _rss_mb(worker)
    finally:
        for s in uploads:
            s.close()
    time.sleep(2.5)  # heap.TRIM_DELAY after the last one closed
    after = _rss_mb(worker)
    assert held - before > 40, (before, held)
    assert after - before < (held - before) / 4, (before, held, after)
