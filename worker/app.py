"""Routes: what each URL does, and the mapping of worker errors to answers."""
import logging
import time
import urllib.parse
import uuid

from sandbox.manager import escape_line
from sandbox.runtime import proto

from .errors import (BadRequest, Busy, HandlerRaised, MethodNotAllowed, NotFound, Unavailable,
                     WorkerError)
from .heap import GiveBack
from .http import Response, json_response

log = logging.getLogger("worker")
RUN_PREFIXES = ("/run/", "/runLambda/")


class FailureLog:
    """Calls that failed for other reasons than the function's own
    exceptions (its sandbox died, timed out or broke the protocol, no
    sandbox could be had or built), in the worker's log for its operator:
    one line per function and kind of failure every EVERY seconds at most,
    saying how many more there were, so that a function failing in a loop
    cannot flood the log."""
    EVERY = 10.0

    def __init__(self):
        self.last = {}  # (function, error type) -> [when last logged, failures since]

    def note(self, name, request_id, error):
        if isinstance(error, HandlerRaised) or (error.status < 500 and not isinstance(error, Busy)):
            return
        key = (name, error.error_type)
        now = time.monotonic()
        seen = self.last.get(key)
        if seen is not None and now - seen[0] < self.EVERY:
            seen[1] += 1
            return
        more = " (and %d more like it in the last %.0f s)" % (seen[1], now - seen[0]) \
            if seen and seen[1] else ""
        self.last[key] = [now, 0]
        if len(self.last) > 10_000:  # names are the callers' to choose: forget the oldest
            del self.last[next(iter(self.last))]
        # Escaped as handler output is: the message may quote the function's code.
        text = escape_line(str(error)[:500].encode()).decode()
        log.warning("call %s to %r: %d %s: %s%s", request_id, name[:200], error.status,
                    error.error_type, text, more)


# Bodies up to this size are checked here, so that garbage costs no
# sandbox; bigger ones only by the handler's runtime, which parses them
# anyway, the same way (a 400 either way).  Here, the parse would hold the
# worker's only thread: 6 MB of [[],[],...] took 0.8 s, and every other
# client waited (the C parser never lets go of the GIL, so no thread helps).
# 64 KiB parse in about a millisecond at worst.
CHECKED_HERE = 64 << 10


class App:
    def __init__(self, table, max_body, max_connections):
        self.table = table
        self.cpu_latency = None  # a worker.cpu_latency.CpuLatency, set by the server
        self.max_body = max_body
        self.max_connections = max_connections
        self.failures = FailureLog()
        self.connections = 0  # open now: counted by the HTTP layer
        self.unread = set()   # connections with answers their clients do not read: the same
        self.bodies = 0       # bytes of request bodies held: the same
        self.uploading = set()  # connections that hold some of them: the same
        self.shedding = None  # a timer that cuts off clients not reading (the HTTP layer's)
        self.give_back = GiveBack()  # what closed connections let go (the HTTP layer's)
        self.ready = False

    def handle_now(self, request):
        """Answer what needs no await; None sends the request to handle()."""
        if request.path.startswith(RUN_PREFIXES):
            return None
        started = time.monotonic()
        return timed(self._route(request, uuid.uuid4().hex), started)

    def _route(self, request, request_id):
        path = request.path
        if path == "*":  # OPTIONS *: what the server as a whole takes (the HTTP layer
            # refuses "*" with any other method)
            return Response(200, b"", b"text/plain", ((b"Allow", b"GET, HEAD, POST"),
                                                      (b"X-Request-Id", request_id.encode())))
        if path == "/status":
            if request.method != "GET":  # HEAD included: the HTTP layer reads it as a GET
                return _error(MethodNotAllowed("use GET for /status", b"GET, HEAD"), request_id)
            if not self.ready:
                return _error(Unavailable("the worker is starting or draining"), request_id)
            trouble = self.table.trouble()
            if trouble:
                return _error(Unavailable("the worker cannot make sandboxes: " + trouble),
                              request_id)
            return Response(200, b"ready", b"text/plain", ((b"X-Request-Id", request_id.encode()),))
        if path == "/sandboxes":
            if request.method != "GET":
                return _error(MethodNotAllowed("use GET for /sandboxes", b"GET, HEAD"),
                              request_id)
            return json_response(200, self.table.describe(),
                                 ((b"X-Request-Id", request_id.encode()),))
        return _error(NotFound("no route for %s %s" % (request.method, path),
                               "Http.NotFound"), request_id)

    async def handle(self, request):
        started = time.monotonic()
        request_id = uuid.uuid4().hex
        phases = []
        return timed(await self._run(request, request_id, phases), started, phases)

    async def _run(self, request, request_id, phases):
        try:
            name = request.path.split("/", 2)[2]
            if "%" in name:  # /run/hel%6Co is hello
                name = urllib.parse.unquote(name)
            if request.method != "POST":
                raise MethodNotAllowed("use POST to run a function, not %s" % request.method,
                                       b"POST")
            if not self.ready:
                raise Unavailable("the worker is starting or draining")
            # Before the body is parsed: a 404 needs no parse.
            function = self.table.registry.lookup(name)
            if self.cpu_latency is not None:
                self.cpu_latency.call()
            # No body (JSON's whitespace alone: not \v or \f): the event is {}.
            body = request.body if request.body.strip(b" \t\r\n") else b""
            if 0 < len(body) <= CHECKED_HERE:
                check_json(body)
            result = await self.table.invoke(function, request_id, body, phases)
        except WorkerError as e:
            self.failures.note(name, request_id, e)
            return _error(e, request_id)
        except Exception:
            log.exception("request %s to %s failed inside the worker", request_id, request.path)
            return _error(WorkerError("internal worker error; see the worker log"), request_id)
        return Response(200, result, headers=((b"X-Request-Id", request_id.encode()),))


def check_json(body):
    """BadRequest unless `body` is JSON as RFC 8259 has it."""
    try:
        proto.STRICT_JSON.decode(body.decode())
    except ValueError as e:  # UnicodeDecodeError included
        raise BadRequest("the request body is not valid JSON: %s" % e) from None
    except RecursionError:
        raise BadRequest("the request body is not valid JSON: nested too deeply") from None


def timed(response, started, phases=()):
    """`response` with its Server-Timing header."""
    response.headers += ((b"Server-Timing", server_timing(started, phases)),)
    return response


def server_timing(started, phases):
    """The Server-Timing header: where this request's time went, in ms.
    "worker" is the worker's own share: the total less the time spent
    waiting for a sandbox and in the sandbox (including the IPC to it)."""
    total = time.monotonic() - started
    elsewhere = sum(s for name, s, note in phases
                    if name in ("egress", "wait", "wake", "attach", "drop", "load", "handler",
                                "ipc"))
    parts = ["total;dur=%.3f" % (total * 1e3), "worker;dur=%.3f" % ((total - elsewhere) * 1e3)]
    for name, seconds, note in phases:
        part = "%s;dur=%.3f" % (name, seconds * 1e3)
        parts.append(part + (';desc="%s"' % note if note else ""))
    return ", ".join(parts).encode()


def _error(error, request_id):
    headers = tuple(error.headers) + ((b"X-Request-Id", request_id.encode()),)
    return Response(error.status, error.body(request_id), headers=headers)
