"""A fault-injecting HTTP proxy for tests: put it between an S3 client and the local moto server.

    with LocalS3Server() as s3, FaultyProxy(s3.endpoint_url, fail_rate=0.2) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, ...)

Each request is either forwarded whole, byte for byte (request line, headers as sent -- Host included, so
SigV4 signatures stay valid -- and the body with its own framing: Content-Length, chunked, aws-chunked),
or hit by exactly one fault, chosen with a seeded RNG:

  fail   answer 503 SlowDown (one time in four 500 InternalError) with an S3 error XML body; not forwarded
  reset  close the client's connection with an RST (SO_LINGER 0) and no response; not forwarded
  stall  wait `stall_seconds`, then forward the request whole (like a slow server: the request still takes
         effect upstream even when the client has given up on it and retried)
  cut    forward the request, relay the response's head and the first half of its body, then RST: a
         connection reset mid-body, which no HTTP status shows (a response without a body is relayed whole)

`ignore_conditions = True` makes the store behind the proxy act like one that ignores conditional writes
(s3rver answers 200 to an If-None-Match PUT of an existing key): it renames the request's If-None-Match and
If-Match headers before forwarding, keeping their length (moto does not check signatures unless told to).

A fault never touches a response that came from upstream, so whatever the client receives is either
upstream's complete answer or an unmistakable failure. The rates are plain attributes: set them to 0 to
pause faults (to create a bucket, say) and back again.

`hold` (a predicate (method, target) -> bool) makes the proxy hold the first request it accepts: the request is
received whole (a client sending `Expect: 100-continue` is told to go on), `.held` is set, and nothing is
forwarded until `release()`; then it is forwarded as any other, and `.held_answered` is set once upstream has
answered it (its status in `.held_status`), whether or not its client is still there to read the answer. This
is a request that arrives late: sent by a driver before it lost its lease, taking effect long after.

`.stats` (a snapshot, thread-safe): requests seen, forwarded (answered by upstream), fail, reset and stall
(faults injected), client_gone (the client hung up mid-exchange, so its answer, if any, was dropped:
usually a client that timed out on a stall) and errors (upstream failed; the client then got an RST).
`.history` lists (method, target, fault or None) for every request; `reset_stats()` clears both.

A stall holds the request head back too, so a client that sent `Expect: 100-continue` waits for the
"100 Continue" through the stall: botocore sends its body after 1 s anyway and then hits read_timeout,
but aiohttp (hence s3fs/aiobotocore, which sends Expect on every PutObject) waits with no timer running,
for the whole stall, and then succeeds.

Standard library only; one thread per client connection and a fresh upstream connection per request.
"""

from __future__ import annotations

import io
import random
import select
import socket
import socketserver
import struct
import threading
import uuid
from urllib.parse import urlsplit

FAULTS = ("fail", "reset", "stall", "cut")
MAX_LINE = 65536
MAX_HEADERS = 200
UPSTREAM_TIMEOUT = 60.0
CONTINUE_WAIT = 3.0  # how long to wait for upstream's "100 Continue" before sending the body anyway
COPY_SIZE = 64 * 1024

_ERRORS = {
    503: ("Service Unavailable", "SlowDown", "Please reduce your request rate."),
    500: ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


class FaultyProxy:
    """Proxy to `upstream_url` on 127.0.0.1 (a free port; see `.url`); faults only `methods` if given."""

    def __init__(self, upstream_url: str, fail_rate: float = 0.2, stall_rate: float = 0.05,
                 stall_seconds: float = 5.0, reset_rate: float = 0.05, seed: int = 0,
                 methods: set[str] | list[str] | tuple[str, ...] | None = None, cut_rate: float = 0.0):
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream_url!r}")
        self.upstream = (upstream.hostname, upstream.port or 80)
        if min(fail_rate, reset_rate, stall_rate, cut_rate) < 0 or fail_rate + reset_rate + stall_rate + cut_rate > 1:
            raise ValueError("fault rates must be >= 0 and add up to at most 1")
        self.fail_rate, self.reset_rate, self.stall_rate = fail_rate, reset_rate, stall_rate
        self.cut_rate = cut_rate
        self.stall_seconds = stall_seconds
        self.methods = {m.upper() for m in methods} if methods is not None else None
        self.ignore_conditions = False  # hide If-None-Match / If-Match from upstream (see the module's doc)
        self.only = None  # optional predicate (method, target) -> bool: fault only the requests it accepts
        self.hold = None  # optional predicate (method, target) -> bool: hold the first request it accepts
        self.held, self.held_answered, self._released = threading.Event(), threading.Event(), threading.Event()
        self.held_status: int | None = None
        self._hold_taken = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "forwarded": 0, "fail": 0, "reset": 0, "stall": 0, "cut": 0,
                       "client_gone": 0, "errors": 0}
        self.history: list[tuple[str, str, str | None]] = []
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FaultyProxy":
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="faulty-proxy", daemon=True)  # short poll: stop() is quick
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes stalled handlers
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # unblock handlers waiting on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- bookkeeping -------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def release(self) -> None:
        """Forward the held request now (see `hold`)."""
        self._released.set()

    def _take_hold(self, method: str, target: str) -> bool:
        with self._lock:
            if self.hold is None or self._hold_taken or not self.hold(method, target):
                return False
            self._hold_taken = True
            return True

    def reset_stats(self) -> None:
        with self._lock:
            for key in self._stats:
                self._stats[key] = 0
            self.history.clear()

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _choose(self, method: str, target: str) -> str | None:
        """Count the request and draw its fault (None: forward it untouched)."""
        with self._lock:
            self._stats["requests"] += 1
            fault = None
            if (self.methods is None or method in self.methods) and (self.only is None or self.only(method, target)):
                draw = self._rng.random()
                for kind in FAULTS:
                    rate = getattr(self, f"{kind}_rate")
                    if draw < rate:
                        fault = kind
                        break
                    draw -= rate
            if fault:
                self._stats[fault] += 1
            self.history.append((method, target, fault))
            return fault

    def _error_status(self) -> int:
        with self._lock:
            return 500 if self._rng.random() < 0.25 else 503


class _ClientGone(Exception):
    """The client's connection broke while we relayed its request or the answer."""


class _UpstreamFailed(Exception):
    """Sending the request body upstream failed."""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, proxy: FaultyProxy):
        self.proxy = proxy
        super().__init__(address, handler)


class _Message:
    """A parsed request or response head; `raw` is exactly the bytes that were received."""

    def __init__(self, raw: bytes, start: list[str], headers: list[tuple[str, str]]):
        self.raw, self.start, self.headers = raw, start, headers

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    @property
    def chunked(self) -> bool:
        codings = (self.header("transfer-encoding") or "").lower()
        return codings.split(",")[-1].strip() == "chunked" if codings else False

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value.split(",")[0].strip()) if value is not None else None

    @property
    def version(self) -> str:
        """'HTTP/1.1' or so: first word of a status line, last of a request line."""
        return self.start[0] if self.start[0].startswith("HTTP/") else self.start[-1]

    def wants_close(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens


def _read_head(rfile) -> _Message | None:
    """Read a request or response head; None at a clean end of stream before any byte of it."""
    lines = []
    line = rfile.readline(MAX_LINE)
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between messages
        line = rfile.readline(MAX_LINE)
    if not line:
        return None
    while True:
        if not line.endswith(b"\n"):
            raise ConnectionError("truncated or oversized message head")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
        if len(lines) > MAX_HEADERS:
            raise ConnectionError("too many header lines")
        line = rfile.readline(MAX_LINE)
    text = [ln.decode("latin-1").rstrip("\r\n") for ln in lines[:-1]]
    headers = []
    for ln in text[1:]:
        if ln[:1] in (" ", "\t") and headers:  # obsolete line folding
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + ln.strip())
        else:
            name, _, value = ln.partition(":")
            headers.append((name.strip(), value.strip()))
    return _Message(b"".join(lines), text[0].split(" ", 2), headers)


def _unconditional(head: bytes) -> bytes:
    """The request head with its conditional-write headers renamed (same length), so upstream ignores them."""
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        name = line.split(b":", 1)[0].lower()
        if name in (b"if-none-match", b"if-match"):
            lines[i] = b"No" + line[2:]  # If-None-Match -> No-None-Match: a header nobody reads
    return b"\r\n".join(lines)


def _copy_exact(rfile, n: int, send) -> None:
    while n > 0:
        data = rfile.read(min(n, COPY_SIZE))
        if not data:
            raise ConnectionError("peer closed mid-body")
        if send:
            send(data)
        n -= len(data)


def _copy_chunked(rfile, send) -> None:
    """Relay a chunked body verbatim (chunk sizes, extensions, trailers), stopping at its end."""
    while True:
        line = rfile.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ConnectionError("bad chunk header")
        if send:
            send(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        _copy_exact(rfile, size + 2, send)  # data and its CRLF
    while True:  # trailers, then the blank line
        line = rfile.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ConnectionError("bad chunked trailer")
        if send:
            send(line)
        if line in (b"\r\n", b"\n"):
            return


def _copy_body(message: _Message, rfile, send, *, until_close: bool = False) -> None:
    """Relay (or, with send None, skip) one message body; until_close for a response without framing."""
    if message.chunked:
        _copy_chunked(rfile, send)
    elif message.content_length is not None:
        _copy_exact(rfile, message.content_length, send)
    elif until_close:
        while data := rfile.read1(COPY_SIZE):
            if send:
                send(data)


def _response_has_body(method: str, status: int) -> bool:
    return method != "HEAD" and not (100 <= status < 200 or status in (204, 304))


class _Cut(Exception):
    """Half the response body is relayed: the connection is to be reset now."""


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.proxy = self.server.proxy
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        with self.proxy._lock:
            self.proxy._connections.add(self.sock)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.sock)
        self.rfile.close()

    def handle(self) -> None:
        try:
            while not self.proxy._stopping.is_set():
                request = _read_head(self.rfile)
                if request is None or not self._serve(request):
                    return
        except (OSError, ValueError, ConnectionError):
            return  # the client went away, or sent something unparseable: drop the connection

    def _serve(self, request: _Message) -> bool:
        """Handle one request; True to keep the client connection for another."""
        method = request.start[0].upper()
        expects_continue = (request.header("expect") or "").lower() == "100-continue"
        target = request.start[1] if len(request.start) > 1 else ""
        if self.proxy._take_hold(method, target):
            return self._hold(request, method, expects_continue)
        fault = self.proxy._choose(method, target)
        if fault == "reset":
            self._reset()
            return False
        if fault == "fail":
            if expects_continue:  # the client holds its body back until told: answer now, then close
                self._send_error(method, close=True)
                return False
            _copy_body(request, self.rfile, None)
            self._send_error(method, close=request.wants_close())
            return not request.wants_close()
        if fault == "stall" and self.proxy._stopping.wait(self.proxy.stall_seconds):
            return False
        try:
            keep = self._forward(request, method, expects_continue, cut=fault == "cut")
        except _Cut:
            self._reset()
            return False
        except _ClientGone:  # typically a client that gave up on a stalled request before its answer came
            self.proxy._count("client_gone")
            self._reset()
            return False
        except (_UpstreamFailed, OSError, ValueError):  # upstream failed, or sent something unparseable
            self.proxy._count("errors")
            self._reset()
            return False
        return keep and not request.wants_close()

    def _hold(self, request: _Message, method: str, expects_continue: bool) -> bool:
        """Receive the request whole, wait for `release()`, then forward it (see FaultyProxy.hold)."""
        if expects_continue:
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = io.BytesIO()
        _copy_body(request, self.rfile, body.write)
        body.seek(0)
        self.proxy.held.set()
        while not self.proxy._released.wait(0.05):
            if self.proxy._stopping.is_set():
                return False
        try:
            return self._forward(request, method, False, body=body) and not request.wants_close()
        except (_ClientGone, _UpstreamFailed, OSError, ValueError):
            self._reset()  # upstream has answered, or failed: the client's side is of no interest
            return False
        finally:
            self.proxy.held_answered.set()

    def _forward(self, request: _Message, method: str, expects_continue: bool, cut: bool = False,
                 body=None) -> bool:
        """`body`: the request's body already received (a held request), else it is read from the client."""
        with socket.create_connection(self.proxy.upstream, timeout=UPSTREAM_TIMEOUT) as upstream:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with upstream.makefile("rb") as upstream_rfile:
                upstream.sendall(_unconditional(request.raw) if self.proxy.ignore_conditions else request.raw)
                has_body = request.chunked or bool(request.content_length)
                if expects_continue and has_body:
                    # Relay upstream's verdict: "100 Continue" (then the body follows) or an early final
                    # answer, after which the client's body state is unknown and the connection must go.
                    ready, _, _ = select.select([upstream], [], [], CONTINUE_WAIT)
                    if ready:
                        response = _read_head(upstream_rfile)
                        if response is None:
                            raise ConnectionError("upstream closed before answering")
                        status = int(response.start[1])
                        if status >= 200:
                            self.proxy._count("forwarded")
                        self._to_client(response.raw)
                        if status >= 200:
                            _copy_body(response, upstream_rfile, self._to_client, until_close=True)
                            return False
                try:
                    _copy_body(request, body or self.rfile, self._sender(upstream))
                except OSError as exc:  # reading the client's body failed: it gave up (after a stall, say)
                    raise _ClientGone from exc
                while True:
                    response = _read_head(upstream_rfile)
                    if response is None:
                        raise ConnectionError("upstream closed before answering")
                    status = int(response.start[1])
                    if status >= 200 or status == 101:
                        self.proxy._count("forwarded")  # before the client can see the answer
                        if body is not None:
                            self.proxy.held_status = status
                        self._to_client(response.raw)
                        break
                    self._to_client(response.raw)  # interim (1xx) responses are relayed too
                if not _response_has_body(method, status):
                    return not response.wants_close()
                if cut and response.content_length:
                    _copy_exact(upstream_rfile, response.content_length // 2, self._to_client)
                    raise _Cut
                delimited = response.chunked or response.content_length is not None
                _copy_body(response, upstream_rfile, self._to_client, until_close=True)
                return delimited and not response.wants_close()

    def _to_client(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _ClientGone from exc

    @staticmethod
    def _sender(upstream: socket.socket):
        def send(data: bytes) -> None:
            try:
                upstream.sendall(data)
            except OSError as exc:
                raise _UpstreamFailed from exc
        return send

    def _send_error(self, method: str, *, close: bool) -> None:
        status = self.proxy._error_status()
        reason, code, message = _ERRORS[status]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>{request_id}</RequestId>"
                f"<HostId>faulty-proxy</HostId></Error>").encode()
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/xml",
                f"Content-Length: {len(body)}", f"x-amz-request-id: {request_id}", "Server: AmazonS3",
                f"Connection: {'close' if close else 'keep-alive'}"]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                          + (body if method != "HEAD" else b""))

    def _reset(self) -> None:
        """Drop the client connection with an RST and no response."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.rfile.close()
        self.sock.close()
