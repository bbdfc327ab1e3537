"""HTTP/1.1 as RFC 9110 and 9112 have it, where clients and proxies rely on
it: Upgrade requests, Date, versions, Expect and keep-alive, against a
real worker."""
import email.utils
import json
import os
import socket
import time

import pytest

from test_http_api import parse_answer, raw_exchange, read_to_close


def answers(data):
    """[(status, headers, body)] of the answers in `data`, in order."""
    found = []
    while data:
        status, headers, rest = parse_answer(data)
        length = int(headers["content-length"])
        found.append((status, headers, rest[:length]))
        data = rest[length:]
    return found


def test_an_upgrade_header_without_connection_upgrade_is_ignored(worker):
    # Without "Connection: upgrade" the parser reads the body as usual: the
    # request must be answered, and those pipelined behind it after it.
    body = b'{"name": "plain"}'
    got = answers(raw_exchange(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n"
                               b"Upgrade: foo\r\nContent-Length: %d\r\n\r\n%s"
                               b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                               % (len(body), body), timeout=5))
    assert [(status, body) for status, _, body in got] == [(200, b'"Hello, plain!"'),
                                                           (200, b"ready")]


def test_an_upgrade_request_with_a_chunked_body_is_refused_not_run_without_it(worker):
    # What curl --http2 -H 'Transfer-Encoding: chunked' sends.
    data = raw_exchange(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n"
                        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                        b"10\r\n{\"name\": \"lost\"}\r\n0\r\n\r\n", timeout=5)
    ((status, headers, body),) = answers(data)
    assert (status, headers["connection"]) == (411, "close")
    error = json.loads(body)
    assert error["errorType"] == "Http.LengthRequired"
    assert error["errorMessage"] == ("an upgrade request (Upgrade: h2c) with a chunked body is "
                                     "not supported: send its Content-Length, or no Upgrade header")


def test_the_answer_to_an_upgrade_request_says_the_connection_closes(worker):
    data = raw_exchange(worker.port, b"GET /status HTTP/1.1\r\nHost: x\r\n"
                        b"Connection: upgrade\r\nUpgrade: h2c\r\n\r\n", timeout=5)
    ((status, headers, body),) = answers(data)
    assert (status, headers["connection"], body) == (200, "close", b"ready")


def test_every_answer_has_a_date(worker):
    before = time.time()
    _, ok, _ = worker.request("GET", "/status")
    _, called, _ = worker.request("POST", "/run/hello", b"{}")
    _, early, _ = parse_answer(raw_exchange(worker.port, b"NOT HTTP\r\n\r\n"))  # a 400
    after = time.time()
    for headers in (ok, called, early):
        when = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        assert int(before) <= when <= after, headers["date"]
        assert headers["date"].endswith(" GMT")


def test_a_version_other_than_1_0_and_1_1_is_505(worker):
    # 2.0 and 0.9 the parser reads; 1.2 and 3.0 it refuses as it refuses a
    # malformed request line, which would be a 400.
    for version in (b"2.0", b"0.9", b"1.2", b"3.0"):
        status, headers, body = parse_answer(raw_exchange(
            worker.port, b"GET /status HTTP/%s\r\nHost: x\r\n\r\n" % version))
        assert (status, headers["connection"]) == (505, "close")
        error = json.loads(body)
        assert error["errorType"] == "Http.VersionNotSupported"
        assert error["errorMessage"] == ("HTTP/%s is not supported: use HTTP/1.1"
                                         % version.decode())
    # HTTP/2 with prior knowledge (curl --http2-prior-knowledge): its preface.
    status, _, body = parse_answer(raw_exchange(worker.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    assert (status, json.loads(body)["errorMessage"]) == (
        505, "HTTP/2.0 is not supported: use HTTP/1.1")


def test_expect_100_continue_is_ignored_on_http_1_0(worker):
    # An HTTP/1.0 client knows no interim answer: a "100 Continue" would be
    # taken for the answer itself.
    body = b'{"name": "old"}'
    data = raw_exchange(worker.port, b"POST /run/hello HTTP/1.0\r\nExpect: 100-continue\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    status, headers, answer = parse_answer(data)
    assert (status, headers["connection"], answer) == (200, "close", b'"Hello, old!"')


def test_an_http_1_0_client_asking_for_keep_alive_is_told_it_has_it(worker):
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while not data.endswith(b"ready"):
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        status, headers, _ = parse_answer(data)
        assert (status, headers["connection"]) == (200, "keep-alive")
        s.sendall(b"GET /status HTTP/1.0\r\n\r\n")  # the connection is still open
        status, headers, body = parse_answer(read_to_close(s))
    assert (status, headers["connection"], body) == (200, "close", b"ready")


def test_an_unknown_function_is_404_whatever_its_body(worker):
    # Looked up before the body is parsed: a 404 takes no parse.
    status, _, error = worker.call("no-such-function", body=b"[" * 4096)
    assert (status, error["errorType"]) == (404, "Function.NotFound")


def test_a_big_body_is_held_to_json_by_the_handler_as_a_small_one_by_the_worker(worker):
    # Past CHECKED_HERE the worker does not parse it (that would hold its
    # only thread): the handler's runtime does, as strictly, and it is 400
    # all the same.  The sandbox serves on.
    from worker.app import CHECKED_HERE
    pad = b" " * CHECKED_HERE
    for small, words in ((b'[NaN]', "NaN is not JSON"), (b'[Infinity]', "Infinity is not JSON"),
                         (b'["\xff"]', "utf-8"), (b'[1,', "Expecting value"),
                         (b"[" * 3000 + b"]" * 3000, "nested too deeply")):
        for body in (small, small + pad):
            status, _, error = worker.call("hello", body=body)
            assert (status, error["errorType"]) == (400, "Runtime.UnmarshalError"), body[:20]
            assert words in error["errorMessage"], error
    status, _, answer = worker.call("hello", body=b'{"name": "big"}' + pad)
    assert (status, answer) == (200, "Hello, big!")


def test_an_http_1_1_request_needs_exactly_one_host(worker):
    for hosts in (b"", b"Host: a\r\nHost: b\r\n"):
        data = raw_exchange(worker.port, b"GET /status HTTP/1.1\r\n%s\r\n" % hosts, timeout=5)
        ((status, headers, body),) = answers(data)
        assert (status, headers["connection"]) == (400, "close"), body
        assert b"exactly one Host header" in body
    # HTTP/1.0 had no Host: it is not asked of it.
    data = raw_exchange(worker.port, b"GET /status HTTP/1.0\r\n\r\n", timeout=5)
    assert answers(data)[0][::2] == (200, b"ready")


@pytest.mark.parametrize("upgrade", [b"", b"Connection: upgrade\r\nUpgrade: foo\r\n"],
                         ids=["plain", "upgrade"])
def test_request_bodies_held_at_once_have_a_budget(worker, upgrade):
    """Past BODIES_MAX of bodies being received (or called with), a big one
    is refused with 503, a small one still passes, and all is given back
    once those clients go.  The body of an upgrade request, which the
    parser hands over raw, counts as any other."""
    from worker.http import BODIES_MAX
    size = 6 << 20  # the default limits.request_kb
    senders = []
    try:
        # All at once: within a second none is too slow (SLOW_BODY) yet.
        for _ in range(BODIES_MAX // size + 2):
            s = socket.create_connection(("127.0.0.1", worker.port))
            senders.append(s)
            s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n"
                      % (upgrade, size) + b" " * (size - 1))  # all but its last byte: held
        said = []
        for s in senders:
            s.settimeout(0.05)
            try:
                said.append(s.recv(65536))
            except socket.timeout:
                said.append(None)
        refused = [i for i, data in enumerate(said) if data]
        assert refused and refused[0] >= BODIES_MAX // size, said  # not before the budget was spent
        for i in refused:
            assert said[i].startswith(b"HTTP/1.1 503 ") and b"of request bodies" in said[i]
            assert b"Retry-After: 1" in said[i]
        senders = [s for i, s in enumerate(senders) if i not in refused]
        assert worker.call("hello", {"name": "small"})[::2] == (200, "Hello, small!")
        # A second on, the stalled uploads are too slow: a big body sheds
        # them (408), largest first, rather than be refused.
        time.sleep(1.1)
        status, _, answer = worker.call("hello", body=b'{"name": "big"}' + b" " * (3 << 20))
        assert (status, answer) == (200, "Hello, big!")
        shed = 0
        for s in senders:
            s.settimeout(0.3)
            try:
                shed += s.recv(65536).startswith(b"HTTP/1.1 408 ")
            except socket.timeout:
                pass
        assert shed >= 1
    finally:
        for s in senders:
            s.close()
    deadline = time.monotonic() + 5
    while worker.call("hello", body=b'{"name": "big"}' + b" " * (1 << 20))[0] != 200:
        assert time.monotonic() < deadline  # the closed ones' bodies are let go
        time.sleep(0.05)
    # And an answered call's body is let go: more than the budget, one by one.
    for _ in range(BODIES_MAX // (1 << 20) + 8):
        assert worker.call("hello", body=b'{"name": "big"}' + b" " * (1 << 20))[0] == 200


def test_a_transfer_coding_other_than_chunked_is_501(worker):
    data = raw_exchange(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                        b"5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n", timeout=5)
    ((status, headers, body),) = answers(data)
    assert (status, headers["connection"]) == (501, "close")
    assert json.loads(body)["errorType"] == "Http.NotImplemented"


def test_an_unknown_method_is_501_and_bytes_that_are_no_http_400(worker):
    data = raw_exchange(worker.port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"BREW /run/hello HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    (first, (status, headers, body)) = answers(data)
    assert first[0] == 200  # the request before it is answered
    assert (status, headers["connection"]) == (501, "close")
    assert json.loads(body)["errorType"] == "Http.NotImplemented"
    assert "BREW" in json.loads(body)["errorMessage"]
    data = raw_exchange(worker.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", timeout=5)
    ((status, headers, body),) = answers(data)
    assert (status, json.loads(body)["errorType"]) == (400, "Http.BadRequest")


def test_a_big_body_before_an_unfinished_head_is_not_counted_as_that_heads(worker):
    body = b'{"name": "%s"}' % (b"x" * 20000)  # no newline in it
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.settimeout(10)
        s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                  b"GET /status HTTP/1.1\r\nHo" % (len(body), body))
        time.sleep(0.2)
        s.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        got = answers(read_to_close(s))
    assert [status for status, _, _ in got] == [200, 200]


def test_repeated_header_lines_are_checked_as_one_list(worker):
    data = raw_exchange(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\n{}\r\n0\r\n\r\n", timeout=5)
    assert answers(data)[0][0] == 501
    data = raw_exchange(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\nExpect: foo\r\n"
                        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n{}", timeout=5)
    assert answers(data)[0][0] == 417


def test_an_http10_message_with_transfer_encoding_ends_its_connection(worker):
    data = raw_exchange(worker.port, b"POST /run/hello HTTP/1.0\r\nConnection: keep-alive\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                        b"GET /status HTTP/1.0\r\n\r\n", timeout=5)
    ((status, headers, body),) = answers(data)  # and nothing after it is served
    assert (status, headers["connection"]) == (200, "close")


def test_host_must_be_a_host(worker):
    for host in (b"a b", b"x/y", b"@@", b"[::1"):
        data = raw_exchange(worker.port, b"GET /status HTTP/1.1\r\nHost: %s\r\n\r\n" % host,
                            timeout=5)
        assert answers(data)[0][0] == 400, host
    for host in (b"localhost:8080", b"[::1]:80", b"127.0.0.1", b""):
        data = raw_exchange(worker.port, b"GET /status HTTP/1.1\r\nHost: %s\r\n"
                            b"Connection: close\r\n\r\n" % host, timeout=5)
        assert answers(data)[0][0] == 200, host


def test_request_targets_a_server_must_refuse_or_take(worker):
    def status_of(line):
        data = raw_exchange(worker.port, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n",
                            timeout=5)
        return answers(data)[0][:2]
    status, headers = status_of(b"OPTIONS * HTTP/1.1")
    assert (status, headers["allow"]) == (200, "GET, HEAD, POST")
    assert status_of(b"GET * HTTP/1.1")[0] == 400
    assert status_of(b"GET *?x HTTP/1.1")[0] == 400
    assert status_of(b"OPTIONS *?x HTTP/1.1")[0] == 400
    assert status_of(b"POST /run/hello#frag HTTP/1.1")[0] == 400
    assert status_of(b"CONNECT example.com:443 HTTP/1.1")[0] == 501


def test_numbers_out_of_range_are_the_clients_fault(worker):
    for body in (b'{"name": 1e999}', b'[-1e400]',
                 b'{"pad": "%s", "n": 1e999}' % (b" " * (100 << 10))):  # checked by the runtime
        status, headers, error = worker.call("hello", body=body)
        assert (status, error["errorType"]) == (400, "Runtime.UnmarshalError"), body[:40]
        assert "out of range" in error["errorMessage"]
        assert "x-function-error" not in headers


def test_only_json_whitespace_makes_an_empty_body(worker):
    assert worker.call("hello", body=b" \r\n\t")[0] == 200  # the event is {}
    assert worker.call("hello", body=b"\x0b")[0] == 400


def test_a_functions_exception_is_never_taken_for_the_clients_fault(worker):
    worker.add_function("posesunmarshal", "E = type('Runtime.UnmarshalError', (Exception,), {})\n"
                        "def handler(event):\n    raise E('internal failure')\n")
    status, headers, error = worker.call("posesunmarshal", {})
    assert (status, headers["x-function-error"]) == (500, "Unhandled")
    assert error["errorMessage"] == "internal failure"


def _worker_rss_kb(w):
    with open(os.path.join(w.path, "workers", str(w.port), "pid")) as f:
        pid = int(f.read())
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_body_of_tiny_chunks_costs_the_worker_its_bytes_not_an_object_each(worker):
    # A million chunks of 2 bytes: 2 MB, held while the call waits for its end.
    before = _worker_rss_kb(worker)
    with socket.create_connection(("127.0.0.1", worker.port)) as s:
        s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Connection: close\r\n\r\n" + b"2\r\n  \r\n" * 1_000_000)
        time.sleep(0.5)
        grown = _worker_rss_kb(worker) - before
        s.sendall(b"0\r\n\r\n")
        status, _, _ = parse_answer(read_to_close(s))
    assert status == 200  # the whole body came: 2 MB of spaces, JSON whitespace: {}
    assert grown < 16 << 10, grown  # a list of its chunks took 55 MB


def _endless(port, start, most):
    """(the answer, bytes sent) of `start`, then "a" without end, until an
    answer comes or `most` bytes are sent."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(start)
        s.settimeout(0.01)
        sent, answer = 0, b""
        while not answer and sent < most:
            try:
                s.sendall(b"a" * 65536)
                sent += 65536
                answer = s.recv(65536)
            except (socket.timeout, BlockingIOError):
                pass
    return answer, sent


def test_a_chunk_extension_without_end_is_refused_not_read_for_a_minute(worker):
    answer, sent = _endless(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n"
                                         b"Transfer-Encoding: chunked\r\n\r\n2;", 1 << 30)
    status, headers, body = parse_answer(answer)
    assert status == 413 and json.loads(body)["errorMessage"].startswith(
        "chunked framing (chunk extensions, trailer fields) of "), body
    assert sent < 1 << 20


def test_a_trailer_field_without_end_is_refused_not_gathered(worker):
    answer, sent = _endless(worker.port, b"POST /run/hello HTTP/1.1\r\nHost: x\r\n"
                                         b"Transfer-Encoding: chunked\r\n\r\n"
                                         b"2\r\n{}\r\n0\r\nX-T: ", 64 << 20)
    assert parse_answer(answer)[0] == 413 and sent < 1 << 20, sent


def test_requests_pipelined_after_a_body_are_not_counted_as_its_framing(own_worker):
    w = own_worker(limits={"request_kb": 1})  # a body of 1 KB: framing up to 6 x it + 64 KiB
    pipelined = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 7000  # 231 KB
    event = b'{"name": "P", "pad": "%s"}' % (b"p" * 900)
    for head, body in ((b"Content-Length: %d\r\n" % len(event), event),
                       (b"Transfer-Encoding: chunked\r\n",
                        b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))):
        with socket.create_connection(("127.0.0.1", w.port)) as s:
            s.sendall(b"POST /run/hello HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body[:100])
            time.sleep(0.2)  # the body has begun
            s.sendall(body[100:] + pipelined + b"GET /status HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
            s.settimeout(30)
            answers = read_to_close(s)
        status, _, rest = parse_answer(answers)
        assert status == 200 and rest.startswith(b'"Hello, P!"'), (head, rest[:300])
        assert answers.count(b"HTTP/1.1 200 OK\r\n") == 7002, head
