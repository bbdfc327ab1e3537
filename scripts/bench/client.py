"""A minimal keep-alive HTTP/1.1 client over a raw socket: it adds tens of
microseconds per call, so what it measures is the server, not the client."""
import socket
import time


class Client:
    def __init__(self, port, host="127.0.0.1"):
        self.address = (host, port)
        self.sock = None

    def _connect(self):
        self.sock = socket.create_connection(self.address, timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def post(self, path, body=b"{}"):
        """(status, headers, body, seconds) of one POST."""
        if self.sock is None:
            self._connect()
        request = b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s" % (
            path.encode(), len(body), body)
        start = time.perf_counter()
        self.sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        length = int(headers.get("content-length", 0))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection mid-body")
            rest += chunk
        elapsed = time.perf_counter() - start
        if headers.get("connection") == "close":
            self.close()
        return int(lines[0].split()[1]), headers, rest[:length], elapsed


def phases(headers):
    """Server-Timing as {phase: ms}."""
    out = {}
    for part in headers.get("server-timing", "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name and rest:
            out[name] = float(rest.split(";")[0])
    return out
