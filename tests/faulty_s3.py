"""A fault-injecting HTTP proxy for S3 tests: it stands in front of an S3 server (moto) on 127.0.0.1 and fails a
seeded share of the requests the way a busy S3 endpoint and a flaky network do.

Kinds of fault (each request draws at most one):

- ``slowdown``: answered ``503 SlowDown`` with S3's XML error body; the request never reaches S3.
- ``reset_before``: the connection is reset (RST) once the request has been read; it never reaches S3.
- ``reset_after``: the request is forwarded and applied, then the connection is reset instead of answering:
  the client does not know that its write happened, and retries it.
- ``stall``: the answer is held back ``stall_s`` seconds before it is relayed (a client with a shorter read
  timeout gives up and retries; the request itself was applied).

One exception, to model S3 rather than moto: S3 answers a repeated CompleteMultipartUpload of a completed
upload with success (it is idempotent there); moto answers NoSuchUpload. A lost answer to one (``reset_after``
on ``POST ?uploadId=``) would test moto's gap, not the code, so such a request draws ``reset_before`` instead.

Each client connection is served by a thread: read one request (Content-Length or chunked body, ``Expect:
100-continue`` answered), forward it on a fresh upstream connection, relay the answer with a Content-Length,
loop while the client keeps the connection alive. :attr:`FaultyS3.faults` counts the faults injected by kind,
:attr:`FaultyS3.requests` the requests by method, :attr:`FaultyS3.seen` lists each ``(method, target)``;
:attr:`FaultyS3.plan` holds faults the next requests draw first, in order (None: no fault).
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTY0001</RequestId></Error>"
)
KINDS = ("slowdown", "reset_before", "reset_after", "stall")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class _Closed(Exception):
    """The client closed its connection (between requests: the normal end of a keep-alive connection)."""


def _read_request(reader, writer: socket.socket) -> tuple[str, str, list[tuple[str, str]], bytes]:
    line = reader.readline(65537)
    if not line or not line.strip():
        raise _Closed
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        raw = reader.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    fields = {name.lower(): value for name, value in headers}
    if fields.get("expect", "").lower() == "100-continue":
        writer.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                break
            body += reader.read(size)
            reader.readline()
        return method, target, headers, bytes(body)
    return method, target, headers, reader.read(int(fields.get("content-length", "0") or 0))


def _reset(connection: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        connection.close()


class FaultyS3:
    """The proxy: ``FaultyS3(upstream, failure_share=0.1, seed=0)`` then :meth:`start`; :attr:`endpoint` is its URL.

    Args:
        upstream: the S3 server's URL (``http://127.0.0.1:PORT``).
        failure_share: the share of requests that draw a fault.
        kinds: the faults drawn, with weights (default: 503 SlowDown, reset before, reset after, equally).
        stall_s: how long a ``stall`` holds the answer back.
    """

    def __init__(
        self,
        upstream: str,
        *,
        failure_share: float,
        seed: int = 0,
        kinds: dict[str, float] | None = None,
        stall_s: float = 2.0,
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.failure_share = failure_share
        self.kinds = kinds or {"slowdown": 1.0, "reset_before": 1.0, "reset_after": 1.0}
        assert set(self.kinds) <= set(KINDS), self.kinds
        self.stall_s = stall_s
        self.faults: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.seen: list[tuple[str, str]] = []
        self.plan: collections.deque[str | None] = collections.deque()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def start(self) -> FaultyS3:
        threading.Thread(target=self._accept, daemon=True, name="faulty-s3").start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.close()
        with self._lock:
            for connection in list(self._open):
                connection.close()

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _draw(self, method: str, target: str) -> str | None:
        with self._lock:
            self.requests[method] += 1
            self.seen.append((method, target))
            if self.plan:
                kind = self.plan.popleft()
            elif self._random.random() < self.failure_share:
                names = list(self.kinds)
                kind = self._random.choices(names, weights=[self.kinds[n] for n in names])[0]
            else:
                kind = None
            if kind is None:
                return None
            if kind == "reset_after" and method == "POST" and "uploadId=" in target:
                kind = "reset_before"  # S3 completes a completed upload again; moto does not (see above)
            self.faults[kind] += 1
            return kind

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        reader = connection.makefile("rb")
        try:
            while True:
                method, target, headers, body = _read_request(reader, connection)
                kind = self._draw(method, target)
                if kind == "reset_before":
                    return _reset(connection)
                if kind == "slowdown":
                    self._answer(
                        connection, method, 503, "Slow Down", [("Content-Type", "application/xml")], SLOWDOWN_BODY
                    )
                    continue
                status, reason, answer_headers, answer = self._forward(method, target, headers, body)
                if kind == "reset_after":
                    return _reset(connection)
                if kind == "stall":
                    time.sleep(self.stall_s)
                self._answer(connection, method, status, reason, answer_headers, answer)
                if any(n.lower() == "connection" and v.lower() == "close" for n, v in headers):
                    return connection.close()
        except (_Closed, OSError, ValueError):
            connection.close()
        finally:
            reader.close()
            with self._lock:
                self._open.discard(connection)

    def _forward(self, method: str, target: str, headers: list, body: bytes) -> tuple[int, str, list, bytes]:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or method in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            upstream.close()

    @staticmethod
    def _answer(connection: socket.socket, method: str, status: int, reason: str, headers: list, body: bytes) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (lowered == "content-length" and method != "HEAD"):
                continue
            lines.append(f"{name}: {value}")
        if method != "HEAD":
            lines.append(f"Content-Length: {len(body)}")
            payload = body
        else:
            payload = b""  # a HEAD answer keeps the object's Content-Length and has no body
            if not any(n.lower() == "content-length" for n, _ in headers):
                lines.append("Content-Length: 0")
        lines.append("Connection: keep-alive")
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
