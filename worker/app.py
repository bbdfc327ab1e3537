"""Routes: what each URL does, and the mapping of worker errors to answers."""
import json
import logging
import uuid

from .errors import BadRequest, MethodNotAllowed, NotFound, Unavailable, WorkerError
from .http import Response, json_response

log = logging.getLogger("worker")
RUN_PREFIXES = ("/run/", "/runLambda/")


class App:
    def __init__(self, table, max_body):
        self.table = table
        self.max_body = max_body
        self.ready = False

    def handle_now(self, request):
        """Answer what needs no await; None sends the request to handle()."""
        path = request.path
        if path.startswith(RUN_PREFIXES):
            return None
        request_id = uuid.uuid4().hex
        if path == "/status":
            if not self.ready:
                return _error(Unavailable("the worker is starting or draining"), request_id)
            return Response(200, b"ready", b"text/plain", ((b"X-Request-Id", request_id.encode()),))
        if path == "/sandboxes":
            if request.method != "GET":
                return _error(MethodNotAllowed("use GET for /sandboxes"), request_id)
            return json_response(200, self.table.describe(),
                                 ((b"X-Request-Id", request_id.encode()),))
        return _error(NotFound("no route for %s %s" % (request.method, path),
                               "Http.NotFound"), request_id)

    async def handle(self, request):
        request_id = uuid.uuid4().hex
        try:
            name = request.path.split("/", 2)[2]
            if request.method != "POST":
                raise MethodNotAllowed("use POST to run a function, not %s" % request.method)
            body = request.body if request.body.strip() else b""  # no body: the event is {}
            if body:
                try:
                    json.loads(body)
                except ValueError as e:
                    raise BadRequest("the request body is not valid JSON: %s" % e) from None
            if not self.ready:
                raise Unavailable("the worker is starting or draining")
            result = await self.table.invoke(name, request_id, body)
        except WorkerError as e:
            return _error(e, request_id)
        except Exception:
            log.exception("request %s to %s failed inside the worker", request_id, request.path)
            return _error(WorkerError("internal worker error; see the worker log"), request_id)
        return Response(200, result, headers=((b"X-Request-Id", request_id.encode()),))


def _error(error, request_id):
    headers = tuple(error.headers) + ((b"X-Request-Id", request_id.encode()),)
    return Response(error.status, error.body(request_id), headers=headers)
