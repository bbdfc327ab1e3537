"""A small HTTP/1.1 server over asyncio protocols and httptools' parser:
keep-alive, Content-Length and chunked bodies, a body-size limit enforced
before the body is read, and one request in flight per connection."""
import asyncio
import collections
import json
import logging
import uuid

import httptools

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           413: b"Payload Too Large", 429: b"Too Many Requests", 500: b"Internal Server Error",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}
# After answering 413 we read and drop at most this much more, so the client
# sees the answer instead of a connection reset; then we hang up.
DISCARD_LIMIT = 64 << 20

log = logging.getLogger("worker")


class Request:
    __slots__ = ("method", "path", "headers", "body", "keep_alive")

    def __init__(self, method, path, headers, body, keep_alive):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status, body, content_type=b"application/json", headers=()):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = tuple(headers)


def json_response(status, obj, headers=()):
    return Response(status, json.dumps(obj).encode(), headers=headers)


def early_error(status, error_type, message):
    """An error answered by the HTTP layer itself, before any route."""
    request_id = uuid.uuid4().hex
    return json_response(status, {"errorType": error_type, "errorMessage": message,
                                  "requestId": request_id},
                         ((b"X-Request-Id", request_id.encode()),))


class HttpProtocol(asyncio.Protocol):
    """`app` has `max_body` and `handle(request) -> Response` (a coroutine),
    and may answer some requests at once with `handle_now(request)`.

    Requests on one connection are answered one at a time, in order: a
    client that pipelines them gets its answers in the order it asked."""

    def __init__(self, app):
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.queue = collections.deque()  # parsed requests waiting their turn
        self.busy = False
        self.upgraded = False  # the client asked to switch protocols
        self.held = None       # an upgrade request whose body comes after it
        self.held_length = 0
        self.held_body = b""
        self._reset()

    def _reset(self):
        self.url = b""
        self.headers = {}
        self.body = []
        self.size = 0
        self.length = None    # Content-Length, when the request gives one
        self.rejected = None  # a Response sent before the body was read

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.upgraded:
            self._collect_held_body(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # A request with "Upgrade:" (curl --http2 on http:// sends h2c).
            # It is answered as plain HTTP/1.1, which is allowed; nothing
            # after it is read.  llhttp hands its body over as data of the
            # new protocol, so the body is taken from there.
            self.upgraded = True
            self._collect_held_body(data[e.args[0]:] if e.args else b"")
            if not self.busy and self.held is None:
                self.transport.close()
        except httptools.HttpParserError:
            self.queue.clear()
            if self.rejected is None:
                self._send(early_error(400, "Http.BadRequest", "malformed HTTP request"), False)
            self.transport.close()

    # -- httptools callbacks ----------------------------------------------------
    def on_message_begin(self):
        self._reset()

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self):
        length = self.headers.get("content-length", "")
        self.length = int(length) if length.isdigit() else None
        if self.length is not None and self.length > self.app.max_body:
            self._reject_too_large()

    def on_body(self, chunk):
        self.size += len(chunk)
        if self.rejected is not None:
            if self.size > DISCARD_LIMIT:
                self.transport.close()
            return
        if self.size > self.app.max_body:  # chunked bodies have no length up front
            self.body = []
            self._reject_too_large()
            return
        self.body.append(chunk)

    def on_message_complete(self):
        if self.rejected is not None:
            self.transport.close()
            return
        request = Request(self.parser.get_method().decode(), self.url.split(b"?", 1)[0].decode(
            "latin-1"), self.headers, b"".join(self.body), self.parser.should_keep_alive())
        if "upgrade" in self.headers and self.length:
            self.held = request  # its body is still to come, after the upgrade point
            self.held_length = self.length
            return
        self.queue.append(request)
        if not self.busy:
            self._next()

    def _collect_held_body(self, data):
        if self.held is None:
            return
        self.held_body += data
        if len(self.held_body) >= self.held_length:
            request, self.held = self.held, None
            request.body = self.held_body[:self.held_length]
            request.keep_alive = False
            self.queue.append(request)
            if not self.busy:
                self._next()

    def _next(self):
        """Answer queued requests in order, until one has to wait."""
        while self.queue and not self.transport.is_closing():
            request = self.queue.popleft()
            try:
                response = self.app.handle_now(request)
            except Exception:
                log.exception("answering %s %s failed", request.method, request.path)
                response = early_error(500, "Platform.Error", "internal worker error")
            if response is None:
                self.busy = True
                self.transport.pause_reading()
                task = asyncio.ensure_future(self.app.handle(request))
                task.add_done_callback(lambda t: self._finish(t, request.keep_alive))
                return
            self._send(response, request.keep_alive)

    # -- answers ------------------------------------------------------------------
    def _reject_too_large(self):
        self.rejected = early_error(413, "Http.RequestTooLarge",
                                    "request body over the limit of %d bytes" % self.app.max_body)
        # Say "Connection: close" but keep reading (and dropping) the body, so
        # the client reads our answer instead of a reset.
        self._send(self.rejected, False, hang_up=False)

    def _finish(self, task, keep_alive):
        self.busy = False
        if task.cancelled():
            self.transport.close()
            return
        self._send(task.result(), keep_alive)
        self._next()
        if self.upgraded and not self.busy:
            self.transport.close()
        elif not self.busy and not self.transport.is_closing():
            self.transport.resume_reading()

    def _send(self, response, keep_alive, hang_up=True):
        if self.transport.is_closing():
            return
        head = [b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            response.status, REASONS.get(response.status, b"Unknown"), response.content_type,
            len(response.body))]
        for name, value in response.headers:
            head.append(b"%s: %s\r\n" % (name, value))
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head) + response.body)
        if not keep_alive and hang_up:
            self.transport.close()
