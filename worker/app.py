"""Routes: what each URL does, and the mapping of worker errors to answers."""
import json
import logging
import time
import urllib.parse
import uuid

from .errors import BadRequest, MethodNotAllowed, NotFound, Unavailable, WorkerError
from .http import Response, json_response

log = logging.getLogger("worker")
RUN_PREFIXES = ("/run/", "/runLambda/")


def _not_json(constant):
    raise ValueError("%s is not JSON" % constant)


# JSON as RFC 8259 has it: UTF-8, and without Python's NaN and Infinity.
STRICT_JSON = json.JSONDecoder(parse_constant=_not_json)


class App:
    def __init__(self, table, max_body, max_connections):
        self.table = table
        self.max_body = max_body
        self.max_connections = max_connections
        self.connections = 0  # open now: counted by the HTTP layer
        self.unread = set()   # connections with answers their clients do not read: the same
        self.ready = False

    def handle_now(self, request):
        """Answer what needs no await; None sends the request to handle()."""
        if request.path.startswith(RUN_PREFIXES):
            return None
        started = time.monotonic()
        return timed(self._route(request, uuid.uuid4().hex), started)

    def _route(self, request, request_id):
        path = request.path
        if path == "/status":
            if request.method != "GET":  # HEAD included: the HTTP layer reads it as a GET
                return _error(MethodNotAllowed("use GET for /status", b"GET"), request_id)
            if not self.ready:
                return _error(Unavailable("the worker is starting or draining"), request_id)
            trouble = self.table.trouble()
            if trouble:
                return _error(Unavailable("the worker cannot make sandboxes: " + trouble),
                              request_id)
            return Response(200, b"ready", b"text/plain", ((b"X-Request-Id", request_id.encode()),))
        if path == "/sandboxes":
            if request.method != "GET":
                return _error(MethodNotAllowed("use GET for /sandboxes", b"GET"), request_id)
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
            body = request.body if request.body.strip() else b""  # no body: the event is {}
            if body:
                try:
                    STRICT_JSON.decode(body.decode())
                except ValueError as e:  # UnicodeDecodeError included
                    raise BadRequest("the request body is not valid JSON: %s" % e) from None
                except RecursionError:
                    raise BadRequest("the request body is not valid JSON: nested too deeply"
                                     ) from None
            if not self.ready:
                raise Unavailable("the worker is starting or draining")
            result = await self.table.invoke(name, request_id, body, phases)
        except WorkerError as e:
            return _error(e, request_id)
        except Exception:
            log.exception("request %s to %s failed inside the worker", request_id, request.path)
            return _error(WorkerError("internal worker error; see the worker log"), request_id)
        return Response(200, result, headers=((b"X-Request-Id", request_id.encode()),))


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
