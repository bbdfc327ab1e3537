"""A small HTTP/1.1 server over asyncio protocols and httptools' parser:
keep-alive, Content-Length and chunked bodies, a body-size limit enforced
before the body is read, limits on request heads, deadlines for slow or
idle clients, and one request in flight per connection."""
import asyncio
import collections
import email.utils
import fcntl
import functools
import json
import logging
import re
import socket
import struct
import termios
import time
import uuid

import httptools

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 411: b"Length Required", 413: b"Payload Too Large",
           414: b"URI Too Long", 417: b"Expectation Failed", 429: b"Too Many Requests",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           501: b"Not Implemented",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
           505: b"HTTP Version Not Supported"}
# httptools would buffer headers of any size and number: these limits are
# checked while the head arrives.
MAX_URL = 8 << 10    # bytes of the request target (414)
MAX_HEAD = 16 << 10  # bytes of the request target and header lines together (431)
MAX_HEADERS = 100    # (431)
# Seconds a client may keep the connection waiting; the defaults of HttpProtocol.
IDLE_TIMEOUT = 60    # for a request, on a new or kept-alive connection: then it is closed
HEADER_TIMEOUT = 10  # for the rest of a request head, from its first byte: then 408
BODY_TIMEOUT = 60    # for the whole body, from the end of the head: then 408
# An error answer ends the connection: we half-close it and read and drop at
# most this much more (for at most BODY_TIMEOUT), because closing with unread
# data makes the kernel reset the connection, and the client may lose the
# answer; then we hang up.
DISCARD_LIMIT = 64 << 20
# Bytes of answers the worker may hold for clients that do not read them
# (whose connections' writing is paused), in its buffers and the kernel's:
# past this, a new call first cuts off those that have taken nothing for
# UNREAD_GRACE s, largest first, and is refused with 503 if that is not
# enough.  Else 120 connections asking for 6 MiB answers and reading none
# held a GB of the worker's memory, which no limit covers; and refusing
# calls alone let clients that read a little now and then refuse everyone's.
UNREAD_MAX = 256 << 20
UNREAD_GRACE = 1.0
# Bytes of request bodies the worker may hold at once, from their first byte
# until their call is answered (each costs about three times that by then:
# its chunks, the joined body, the message to the sandbox).  Past this, a
# body that grows over SMALL_BODY is refused with 503: 32 clients sending
# 6 MB bodies at once took the worker to 970 MB, and glibc kept it.  Small
# bodies still pass, so that big uploads cannot refuse everyone's calls.
BODIES_MAX = 128 << 20
SMALL_BODY = 64 << 10
# While bodies are over that, uploads that have come slower than this since
# their head (or brought nothing for a second) are answered 408 and dropped,
# largest first, before a new body is refused: else 22 clients that sent
# 6 MiB of 6 MiB + 1 and stopped refused every body over SMALL_BODY for
# BODY_TIMEOUT, and again as soon as they reconnected.
SLOW_BODY = 1 << 20  # bytes a second
# Bytes of chunked framing a body may take per byte of its own, plus
# SMALL_BODY: chunks of 1 byte take 5.  The length of a chunk extension or
# of a trailer field has no limit of llhttp's: one stream of "2;aaaa..." had
# the worker read 58 GB in the 60 s of BODY_TIMEOUT, at 25% of a CPU, and
# httptools gathers a trailer's value at a cost that grows with its square
# (47 MiB held the loop for 1.5 s).
FRAMING_PER_BYTE = 6
# Requests answered at once (/status, errors...) that one connection gets
# in a turn of the event loop; the rest of its queue waits for the next
# turn, and it is not read meanwhile.  A client pipelining 300,000 GET
# /status kept the loop to itself: a call on another connection waited
# for all of them, 6.4 s.
SERVE_AT_ONCE = 32

log = logging.getLogger("worker")


class Request:
    """A HEAD request comes as method "GET" with `head` set: the app answers
    it as a GET, and the body of the answer is left out."""
    __slots__ = ("method", "path", "headers", "body", "keep_alive", "head", "http10")

    def __init__(self, method, path, headers, body, keep_alive, head=False, http10=False):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.head = head
        self.http10 = http10  # an HTTP/1.0 request: kept alive only if it asked


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status, body, content_type=b"application/json", headers=()):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = tuple(headers)


def json_response(status, obj, headers=()):
    return Response(status, json.dumps(obj).encode(), headers=headers)


def early_error(status, error_type, message, headers=()):
    """An error answered by the HTTP layer itself, before any route."""
    request_id = uuid.uuid4().hex
    return json_response(status, {"errorType": error_type, "errorMessage": message,
                                  "requestId": request_id},
                         ((b"X-Request-Id", request_id.encode()),) + headers)


@functools.lru_cache(maxsize=1)
def _date_line(second):
    """The Date header line every answer has (RFC 9110, 6.6.1): made once a
    second, not once an answer, for it is on every call's path."""
    return b"Date: %s\r\n" % email.utils.formatdate(second, usegmt=True).encode()


def _path(target):
    """The path of a request target: of its usual form (/run/hello?x), or
    of the absolute form (http://host/run/hello) that a server must accept
    too (RFC 9112, 3.2.2)."""
    if not target.startswith(b"/"):
        try:
            target = httptools.parse_url(target).path or b"/"
        except httptools.HttpParserInvalidURLError:
            pass  # no route has that name: 404
    return target.split(b"?", 1)[0].decode("latin-1")


# A Host value (RFC 9112, 3.2; RFC 3986, 3.2.2): an IP literal in brackets,
# or a name of the characters a host may have, then perhaps a port.
_HOST = re.compile(r"(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?\Z")

# A request line (RFC 9112, 3): a method (a token), a target, a version.
_METHOD = re.compile(rb"(?:^|\n)([!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}) [^ \r\n]+ HTTP/[0-9]\.[0-9]\r?\n")


# A version on a request line that is neither 1.0 nor 1.1: llhttp reads
# 0.9 and 2.0 (on_headers_complete refuses them), and refuses the others
# (1.2, 3.0) itself, as it refuses a malformed line.
_VERSION = re.compile(rb" HTTP/((?!1\.[01])[0-9]\.[0-9])\r?\n")
VERSION_REFUSED = "HTTP/%s is not supported: use HTTP/1.1"


def _unknown_method(data):
    """The method of a whole request line in `data` that the parser does
    not know (it refuses those as it refuses bytes that are no HTTP at all),
    or None.  Only on that error's path: each candidate is fed to a
    parser of its own."""
    for match in _METHOD.finditer(data):
        try:
            httptools.HttpRequestParser(None).feed_data(match.group(1) + b" / HTTP/1.1\r\n")
        except httptools.HttpParserInvalidMethodError:
            return match.group(1).decode("ascii")
        except httptools.HttpParserError:
            pass
    return None


def _shed_slow_bodies(app, now, budget, asking):
    """Answer 408 to the uploads that are too slow (SLOW_BODY) while the
    bodies held are over `budget`, largest first (_fail forgets their
    bytes); not `asking`'s, which the caller refuses if need be."""
    for protocol in sorted(app.uploading, key=lambda p: p.holding, reverse=True):
        if app.bodies <= budget:
            return
        if protocol is asking or protocol.phase != "body" or protocol.closing \
                or protocol.busy or protocol.write_paused:
            continue  # a whole body (its call holds it), or one we stopped reading
        elapsed = now - protocol.body_began
        if elapsed >= 1.0 and (now - protocol.body_at >= 1.0 or
                               protocol.size < SLOW_BODY * elapsed):
            protocol._fail(early_error(408, "Http.RequestTimeout", "request body too slow "
                                       "(%d bytes in %.1f s) while the worker was short of room "
                                       "for bodies" % (protocol.size, elapsed)))


def _shed_unread_later(app, loop):
    """_shed_unread, again a moment later while some clients are not
    reading."""
    app.shedding = None
    _shed_unread(app, loop.time())
    if app.unread:
        app.shedding = loop.call_later(UNREAD_GRACE, _shed_unread_later, app, loop)


def _shed_unread(app, now):
    """What is held for clients that do not read, once those that have
    taken nothing for UNREAD_GRACE s are cut off while it is over
    UNREAD_MAX, largest first."""
    held = {p: p._unsent() for p in app.unread}
    total = sum(held.values())
    for protocol in sorted(held, key=held.get, reverse=True):
        if total <= UNREAD_MAX:
            break
        if now - protocol.paused_at >= UNREAD_GRACE:
            protocol.cut_off()
            app.unread.discard(protocol)
            app.give_back.note(held[protocol], protocol.loop)
            total -= held[protocol]
    return total


class Refused(httptools.HttpParserError):
    """Stops the parser at a request we refuse; its answer is already queued."""


class HttpProtocol(asyncio.Protocol):
    """`app` has `max_body` and `handle(request) -> Response` (a coroutine),
    and may answer some requests at once with `handle_now(request)`.  It
    also has `max_connections`, and `connections`, which this class counts:
    a connection over the limit is answered 503 at once and closed; and
    `unread`, the set of connections whose answers wait for their client
    to read them, which this class keeps (see UNREAD_MAX), and `shedding`,
    its timer for them; and `bodies`, the bytes of request bodies held
    (see BODIES_MAX), and `uploading`, the connections that hold them; and
    `give_back` (worker.heap.GiveBack), told what closed connections let go.

    Requests on one connection are answered one at a time, in order: a
    client that pipelines them gets its answers in the order it asked, and
    an error that ends the connection comes after the answers before it."""

    def __init__(self, app, idle_timeout=IDLE_TIMEOUT, header_timeout=HEADER_TIMEOUT,
                 body_timeout=BODY_TIMEOUT):
        self.app = app
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.tick = min(idle_timeout, header_timeout, body_timeout)  # see _check_deadline
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.loop = None
        self.timer = None
        self.since = 0         # when we started waiting for the client (loop time)
        self.queue = collections.deque()  # parsed requests waiting their turn
        self.busy = False
        self.holding = 0       # bytes of request bodies counted in app.bodies
        self.body_began = 0    # when the body being read began (loop time)
        self.body_at = 0       # when its last bytes came
        self.write_paused = False  # the client is not reading its answers
        self.paused_at = 0     # since when (loop time)
        self.unsent = 0        # bytes of answers not yet sent, at the last deadline check
        self.phase = "idle"    # of the request being read: "idle" (none), "head" or "body"
        self.closing = False   # an error answer ends the queue: nothing more is parsed
        self.dropped = 0       # bytes read since then
        self.upgraded = False  # the client asked to switch protocols (Connection: upgrade)
        self.held = None       # an upgrade request whose body comes after it
        self.held_length = 0
        # Requests answered since the loop last called us (each of its
        # callbacks, data_received, _finish, resume_writing, _new_turn,
        # starts a turn), up to SERVE_AT_ONCE; then the rest of the queue
        # waits for _new_turn, soon.
        self.served = 0
        self.deferred = False
        self._reset()

    def _reset(self):
        self.url = b""
        self.headers = {}
        self.head = False     # a HEAD request
        self.http10 = False   # an HTTP/1.0 request
        self.nheaders = 0
        self.hosts = 0        # Host headers seen
        self.head_size = 0    # bytes of the head the callbacks have seen
        self.head_fed = 0     # bytes of the head fed to the parser, up to the last chunk
        self.first_url = b""  # the target's first piece, if the head began in this chunk
        # One buffer, not a list of the chunks: 3 million chunks of 2 bytes
        # each (a chunked body) made as many objects, 27 times the bytes the
        # body budget counted.
        self.body = bytearray()
        self.size = 0
        self.body_fed = 0     # bytes read of a chunked body, its framing included
        self.continue_due = False  # a 100 Continue to send once earlier answers have gone
        self.length = None    # Content-Length, when the request gives one

    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.app.connections += 1
        if self.app.connections > self.app.max_connections:
            # Its fd is one a sandbox may need: answered without reading it.
            # A request it has sent already may make the close a reset.
            self._send(early_error(503, "Http.TooManyConnections",
                                   "the worker has its most connections open (%d): "
                                   "close some, or try again" % self.app.max_connections,
                                   ((b"Retry-After", b"1"),)), False, True)
            transport.close()
            return
        self.since = self.loop.time()
        self.timer = self.loop.call_later(self.tick, self._check_deadline)

    def connection_lost(self, exc):
        self.app.connections -= 1
        self.app.unread.discard(self)
        self.app.give_back.note(self.holding, self.loop)
        self._release(self.holding)
        if self.timer is not None:
            self.timer.cancel()
        # The parser refers back to us (its callbacks): a cycle, which only
        # a full collection would free, and the worker runs one almost never
        # (server.py).  Every closed connection stayed, with what it held.
        self.parser = None

    def pause_writing(self):
        # Answers pile up unread (a client pipelining and never reading):
        # neither read nor answer more until they drain, or the worker
        # would buffer without bound.
        self.write_paused = True
        self.paused_at = self.loop.time()
        self.app.unread.add(self)
        if self.app.shedding is None:
            # Not only when the next call comes: answers of calls already
            # under way (150 of 6 MiB, to clients that read none) took the
            # worker past a GB, with no call after them.
            self.app.shedding = self.loop.call_later(UNREAD_GRACE, _shed_unread_later, self.app,
                                                     self.loop)
        self.since = self.loop.time()
        self.transport.pause_reading()

    def resume_writing(self):
        self.served = 0
        self.write_paused = False
        self.app.unread.discard(self)
        self.since = self.loop.time()  # the client's deadlines start again
        if not self.busy:
            self.transport.resume_reading()
        self._next()

    def data_received(self, data):
        self.served = 0
        if self.upgraded:
            self._collect_held_body(data)
            return
        if self.closing:
            self.dropped += len(data)
            if self.dropped > DISCARD_LIMIT:
                self.transport.close()
            return
        if self.phase == "head":  # all of the chunk is that head's, unless the head ends in it
            self.head_fed += len(data)
        self.began_here = False
        in_body = self.phase == "body"
        try:
            self.parser.feed_data(data)
            if in_body and self.phase == "body" and self.length is None and not self.closing:
                self._check_framing(len(data))  # all of it the body's
            if self.phase == "head":  # httptools buffers an unfinished header out of sight
                if self.began_here:
                    self.head_fed = self._head_in(data)
                self._check_head(self.head_fed)
        except httptools.HttpParserUpgrade as e:
            # A request with "Upgrade:" and "Connection: upgrade" (curl
            # --http2 on http:// sends h2c).  It is answered as plain
            # HTTP/1.1, which is allowed; nothing after it is read.  llhttp
            # hands its body over as data of the new protocol, so the body
            # is taken from there (a chunked one is refused: on_headers_complete).
            self.upgraded = True
            self._collect_held_body(data[e.args[0]:] if e.args else b"")
            self._next()
        except httptools.HttpParserInvalidMethodError:
            method = _unknown_method(data)
            if method:  # a request, of a method the parser lacks (RFC 9110, 9.1: 501)
                self._fail(early_error(501, "Http.NotImplemented", "method %s is not supported: "
                                       "use POST (or GET, HEAD)" % method))
            else:  # bytes that are no HTTP (a TLS handshake, say)
                self._fail(early_error(400, "Http.BadRequest", "malformed HTTP request: "
                                       "no request line"))
        except httptools.HttpParserError as e:
            if self.closing:  # we stopped the parser, and the answer is queued
                return
            # llhttp stops at HTTP/2's preface ("PRI * HTTP/2.0"), and refuses
            # the versions it does not read.
            version = _VERSION.search(data) if str(e) in (
                "Pause on PRI/Upgrade", "Invalid HTTP version") else None
            if version:  # HTTP/2 with prior knowledge, HTTP/1.2, 3.0...
                self._fail(early_error(505, "Http.VersionNotSupported",
                                       VERSION_REFUSED % version.group(1).decode()))
            else:
                self._fail(early_error(400, "Http.BadRequest", "malformed HTTP request: %s" % e))

    def _check_framing(self, size):
        """`size` more bytes read, all of a chunked body's (it began before
        them and has not ended in them), framing included."""
        self.body_fed += size
        if self.body_fed - self.size > FRAMING_PER_BYTE * self.size + SMALL_BODY:
            self._fail(early_error(413, "Http.RequestTooLarge", "chunked framing (chunk "
                                   "extensions, trailer fields) of %d bytes for a body of %d"
                                   % (self.body_fed - self.size, self.size)))

    def _head_in(self, data):
        """Bytes of an unfinished head that began in `data`, a chunk that may
        also end earlier requests: from its request line, found by its
        method and its target's first piece, to the chunk's end.  Searched
        from the chunk's last blank line on, which no unfinished head holds:
        the last match could be a copy of that text in the head's own
        header value, and the head would be counted short."""
        if not self.first_url:
            return 0  # the method alone so far, a few bytes
        after = data.rfind(b"\r\n\r\n")
        start = data.find(self.parser.get_method() + b" " + self.first_url,
                          after + 4 if after >= 0 else 0)
        return len(data) - start if start >= 0 else len(data)

    # -- httptools callbacks ----------------------------------------------------
    def on_message_begin(self):
        self._reset()
        self.phase = "head"
        self.since = self.loop.time()
        self.began_here = True

    def on_url(self, url):
        if not self.url:  # the method is parsed by now
            self.head = self.parser.get_method() == b"HEAD"
            self.first_url = url
        self.url += url
        self.head_size += len(url)
        self._check_head(self.head_size)

    def on_header(self, name, value):
        key, value = name.decode("latin-1").lower(), value.decode("latin-1")
        # Lines of one name make one list (RFC 9110, 5.3): "Transfer-Encoding:
        # gzip" and "Transfer-Encoding: chunked" are checked as "gzip, chunked".
        self.headers[key] = value if key not in self.headers else self.headers[key] + ", " + value
        self.nheaders += 1
        if len(name) == 4 and name.lower() == b"host":
            self.hosts += 1
        self.head_size += len(name) + len(value) + 4  # "name: value\r\n"
        self._check_head(self.head_size)

    def on_headers_complete(self):
        self.phase = "body"
        self.body_began = self.body_at = self.loop.time()
        version = self.parser.get_http_version()
        if not version.startswith("1."):  # llhttp reads 0.9 and 2.0 too
            self._refuse(505, "Http.VersionNotSupported", VERSION_REFUSED % version)
        self.http10 = version == "1.0"
        if self.hosts != 1 and not self.http10:
            # RFC 9112, 3.2: one Host, which a proxy or a virtual host may
            # route by; two would let two of them disagree about the target.
            self._refuse(400, "Http.BadRequest", "an HTTP/1.1 request needs exactly one Host "
                         "header, not %d" % self.hosts)
        if self.hosts and not _HOST.match(self.headers["host"]):
            self._refuse(400, "Http.BadRequest", "Host %r is no host[:port]"
                         % self.headers["host"][:100])
        self._check_target()
        expect = self.headers.get("expect", "").lower()
        if expect not in ("", "100-continue"):
            self._refuse(417, "Http.ExpectationFailed", "unsupported Expect: %s (only "
                         "100-continue is supported)" % self.headers["expect"])
        coding = self.headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # The parser decodes chunked alone, and passes a body under any
            # other coding on as it came: a gzipped event would reach the
            # JSON check compressed (RFC 9112, 6.1: 501 for a coding we lack).
            self._refuse(501, "Http.NotImplemented", "Transfer-Encoding %r is not supported: "
                         "only chunked" % coding[:100])
        if self.parser.should_upgrade() and coding is not None:  # chunked, by now
            # llhttp hands what follows an upgrade request's head to the new
            # protocol undecoded: a Content-Length body is cut from there
            # (_collect_held_body), but a chunked one would need a decoder
            # of our own.  Refused rather than run the function without its
            # event; the client can send a length, or no Upgrade.
            self._refuse(411, "Http.LengthRequired", "an upgrade request (Upgrade: %s) with a "
                         "chunked body is not supported: send its Content-Length, or no "
                         "Upgrade header" % self.headers.get("upgrade", ""))
        length = self.headers.get("content-length", "")
        self.length = int(length) if length.isdigit() else None
        if self.length is not None and self.length > self.app.max_body:
            self._refuse_too_large()
        # The client waits for this before it sends the body.  Answers go
        # out in order, so not while earlier ones are due: then once they
        # have gone (_next), unless the body has begun.  An HTTP/1.0 client
        # knows no interim answers (RFC 9110, 10.1.1).
        self.continue_due = bool(expect) and not self.http10
        self._send_continue()
        self.since = self.loop.time()

    def _send_continue(self):
        if self.continue_due and not self.busy and not self.queue and not self.size \
                and self.phase == "body" and not self.closing:
            self.continue_due = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _check_target(self):
        """The target forms a server must take, and refusals for those it
        must not (RFC 9112, 3.2): a fragment is never sent, "*" is only
        for OPTIONS, and CONNECT's host:port is for proxies."""
        method = self.parser.get_method()
        if method == b"CONNECT":
            self._refuse(501, "Http.NotImplemented", "method CONNECT is not supported: "
                         "this is no proxy")
        if b"#" in self.url:
            self._refuse(400, "Http.BadRequest", "a request target has no fragment (#)")
        if self.url.startswith(b"*") and (self.url != b"*" or method != b"OPTIONS"):
            self._refuse(400, "Http.BadRequest", "the target * is only for OPTIONS, and alone")

    def on_body(self, chunk):
        self.size += len(chunk)
        if self.size > self.app.max_body:  # chunked bodies have no length up front
            self._refuse_too_large()
        self._hold(len(chunk))
        budget = max(BODIES_MAX, 2 * self.app.max_body)
        if self.size > SMALL_BODY and self.app.bodies > budget:
            _shed_slow_bodies(self.app, self.loop.time(), budget, self)
            if self.app.bodies > budget:
                self._refuse(503, "Worker.Unavailable", "the worker holds %d MiB of request "
                             "bodies: try again" % (self.app.bodies >> 20),
                             ((b"Retry-After", b"1"),))
        self.body += chunk

    def _hold(self, size):
        """`size` more bytes of request bodies are held (BODIES_MAX)."""
        self.holding += size
        self.app.bodies += size
        self.body_at = self.loop.time()
        self.app.uploading.add(self)

    def _release(self, size):
        """`size` bytes of request bodies are no longer held (none once the
        connection is lost, which released all it held)."""
        size = min(size, self.holding)
        self.holding -= size
        self.app.bodies -= size
        if not self.holding:
            self.app.uploading.discard(self)

    def on_message_complete(self):
        self.phase = "idle"
        # Nothing after an upgrade request is read: its answer ends the connection.
        upgrade = self.parser.should_upgrade()
        # An HTTP/1.0 message framed by Transfer-Encoding may have been
        # framed otherwise by a proxy before us: the connection ends with it
        # (RFC 9112, 6.1), so that nothing after it can be smuggled in.
        keep_alive = self.parser.should_keep_alive() and not upgrade and not (
            self.http10 and "transfer-encoding" in self.headers)
        # Its buffer goes now: a connection kept alive would hold it until
        # its next request.
        body, self.body = bytes(self.body), bytearray()
        request = Request("GET" if self.head else self.parser.get_method().decode(),
                          _path(self.url), self.headers, body, keep_alive, self.head,
                          self.http10)
        if upgrade and self.length:
            self.held = request  # its body is still to come, after the upgrade point
            self.held_length = self.length
            self.phase = "body"  # and has the body's deadline
            return
        self.queue.append(request)
        self._next()

    def _collect_held_body(self, data):
        if self.held is None:
            return
        if data:
            try:  # counted, limited and kept as any other body is
                self.on_body(data[:self.held_length - self.size])
            except Refused:
                return  # answered, and the request let go (_fail)
        if self.size >= self.held_length:
            request, self.held = self.held, None
            request.body, self.body = bytes(self.body), bytearray()  # as on_message_complete
            self.phase = "idle"
            self.queue.append(request)
            self._next()

    # -- limits ---------------------------------------------------------------------
    def _check_head(self, size):
        if len(self.url) > MAX_URL:
            self._refuse(414, "Http.UriTooLong", "request target exceeds %d bytes" % MAX_URL)
        if self.nheaders > MAX_HEADERS:
            self._refuse(431, "Http.HeadersTooLarge", "more than %d request headers" % MAX_HEADERS)
        if size > MAX_HEAD:
            self._refuse(431, "Http.HeadersTooLarge", "request headers exceed %d bytes" % MAX_HEAD)

    def _refuse_too_large(self):
        self._refuse(413, "Http.RequestTooLarge",
                     "request body over the limit of %d bytes (limits.request_kb)" % self.app.max_body)

    def _refuse(self, status, error_type, message, headers=()):
        self._fail(early_error(status, error_type, message, headers))
        raise Refused(message)

    # -- deadlines ----------------------------------------------------------------
    # One timer per connection checks the client's deadline.  It is never set
    # further ahead than the shortest timeout, so a deadline that starts
    # meanwhile is still met on time, and a change of phase (three a request)
    # only notes the time instead of rescheduling a timer.
    def _check_deadline(self):
        left = self.tick
        if self.write_paused or self.transport.is_closing():
            # Its own deadlines wait while we do not read it; but a client
            # that stops reading its answers for good is cut off, or its
            # unsent answers would be held until it goes away, and with them
            # its place among max_connections.  A transport closed with
            # answers still unsent stays open until they are.  A client that
            # reads, however slowly, is not cut off: its clock starts again.
            unsent = self._unsent()
            if unsent < self.unsent:
                self.since = self.loop.time()
            self.unsent = unsent
            left = min(left, self.since + self.idle_timeout - self.loop.time())
            if left <= 0:
                self.cut_off()
                return
        elif not self.busy:  # no deadline while we make an answer
            if self.closing:  # for the client to stop sending, after an error answer
                timeout = self.body_timeout
            else:
                timeout = {"idle": self.idle_timeout, "head": self.header_timeout,
                           "body": self.body_timeout}[self.phase]
            left = min(left, self.since + timeout - self.loop.time())
            if left <= 0:
                self._expired()
                left = self.tick
        self.timer = self.loop.call_later(left, self._check_deadline)  # until connection_lost

    def cut_off(self):
        """Close at once, answers unsent: with a reset, for a plain close
        leaves what the kernel holds to be sent on, for as long as the
        client takes (megabytes, to one that reads a little at a time)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    def _unsent(self):
        """Bytes of answers the client has not taken yet: in our buffer, and
        in the kernel's send queue, which holds megabytes and is where a
        slow reader's progress shows first."""
        queued = 0
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                        bytes(4)))[0]
            except OSError:
                pass
        return self.transport.get_write_buffer_size() + queued

    def _expired(self):
        if self.closing or self.phase == "idle":  # nothing to answer
            self.transport.close()
        elif self.phase == "head":
            self._fail(early_error(408, "Http.RequestTimeout", "request headers incomplete "
                                   "after %g s" % self.header_timeout))
        else:
            self._fail(early_error(408, "Http.RequestTimeout", "request body incomplete "
                                   "after %g s" % self.body_timeout))

    # -- answers ------------------------------------------------------------------
    def _fail(self, response):
        """Parse nothing more: answer `response` after the requests before it,
        then hang up."""
        self.closing = True
        self.held = None
        if self.phase == "body":  # what came of a body refused is not held for it
            self.body = bytearray()
            self._release(self.size)
        self.queue.append(response)
        self._next()

    def _next(self):
        """Answer queued requests in order, until one has to wait, or
        SERVE_AT_ONCE are answered in this turn of the loop."""
        while self.queue and not self.busy and not self.write_paused \
                and not self.transport.is_closing():
            if self.served == SERVE_AT_ONCE:
                if not self.deferred:  # the others' turn first
                    self.deferred = True
                    self.transport.pause_reading()
                    self.loop.call_soon(self._new_turn)
                break
            self.served += 1
            item = self.queue.popleft()
            if isinstance(item, Response):  # an error, the last answer (see _fail)
                self._send(item, False, with_body=not self.head)
                self.transport.write_eof()  # see DISCARD_LIMIT
            else:
                self._serve(item)
        if not self.busy:
            self.since = self.loop.time()
            self._send_continue()

    def _new_turn(self):
        self.served = 0
        self.deferred = False
        self._next()
        if not (self.deferred or self.busy or self.write_paused or self.transport.is_closing()):
            self.transport.resume_reading()

    def _serve(self, request):
        try:
            response = self.app.handle_now(request)
        except Exception:
            log.exception("answering %s %s failed", request.method, request.path)
            response = early_error(500, "Platform.Error", "internal worker error")
        if response is None and self.app.unread:
            held = _shed_unread(self.app, self.loop.time())
            if held > UNREAD_MAX:
                response = early_error(503, "Worker.Unavailable",
                                       "the worker holds %d MiB of answers that their clients "
                                       "do not read: try again" % (held >> 20),
                                       ((b"Retry-After", b"1"),))
        if response is not None:
            self._answer(request, response)
            return
        self.busy = True
        self.transport.pause_reading()
        task = asyncio.ensure_future(self.app.handle(request))
        task.add_done_callback(functools.partial(self._finish, request))

    def _finish(self, request, task):
        self.served = 0
        self.busy = False
        if task.cancelled():
            self.transport.close()
            return
        self._answer(request, task.result())
        if not self.write_paused:
            self.transport.resume_reading()
        self._next()

    def _answer(self, request, response):
        self._release(len(request.body))
        self._send(response, request.keep_alive, with_body=not request.head,
                   http10=request.http10)
        if not request.keep_alive:
            self.transport.close()

    def _send(self, response, keep_alive, with_body, http10=False):
        if self.transport.is_closing():
            return
        lines = [b"HTTP/1.1 %d %s\r\n%sContent-Type: %s\r\nContent-Length: %d\r\n" % (
            response.status, REASONS.get(response.status, b"Unknown"),
            _date_line(int(time.time())), response.content_type, len(response.body))]
        for name, value in response.headers:
            lines.append(b"%s: %s\r\n" % (name, value))
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif http10:  # HTTP/1.0 closes unless told otherwise
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines) + (response.body if with_body else b""))
