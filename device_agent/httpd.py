"""The HTTP/1.1 the inference API speaks (device_agent.serving), on the standard library's socket servers.

Just what the API needs, bounded everywhere: a request line of at most 64 KiB, at most 100 header lines of at most
8 KiB, keep-alive (HTTP/1.1, or HTTP/1.0 asking for it), ``Expect: 100-continue`` (curl sends it for bodies over
1 KiB), bodies by ``Content-Length`` read straight into one buffer, a per-connection thread, at most
``connections`` of them (beyond: 503 and the connection closes), an idle connection closed after ``timeout``.
Every malformed request is a JSON error naming what was wrong. ``http.server`` is not used: its header parsing goes
through the email package (a third of a small request's cost) and it and what it imports are ~2.5 MB of the
agent's resident memory.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import stat
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_LINE, MAX_HEADERS, MAX_HEADER_LINE = 65536, 100, 8192
# A connection answered before its body was read (413, 503, 411...) is closed by lingering: the write side shut,
# what the client still sends read and dropped, for at most this long and this many bytes, until the client closes.
# Closed at once, the client's writes of the rest of its body fail (EPIPE on a Unix socket, a reset on TCP that can
# also discard the answer) before it reads why it was refused. nginx's lingering_close is the same idea.
LINGER_S, LINGER_BYTES = 2.0, 4 << 20


class Headers(dict):
    """Request headers by lower-cased name; ``get`` takes any case."""

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key.lower(), value)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


class HttpError(Exception):
    """A request this server cannot take: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def read_exactly(stream, n: int) -> bytearray:
    """``n`` bytes of the body into one buffer, read straight into it (a .npy image is used in place). The buffer
    is allocated whole: what bounds it is the BodyBudget the caller took ``n`` from, not the client's word."""
    body = bytearray(n)
    view, got = memoryview(body), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise ConnectionError(f"the request body ended after {got} of {n} bytes")
        got += k
    return body


class BodyBudget:
    """Bytes of request bodies being read at once, over every connection: a body that would go past ``total``
    is refused (503) before a byte of it is read, so many connections declaring large bodies cannot exhaust the
    device's memory."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


_TOKEN = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Handler(socketserver.StreamRequestHandler):
    """One connection: requests one after the other until either side closes. Subclasses give ``routes``:
    ``{(method, path): bound method name}``, and ``not_found``."""

    timeout = 60  # an idle keep-alive connection is closed after a minute
    rbufsize = 256 * 1024  # a 224x224x3 float32 body is 600 KB: read in few calls, not 8 KB ones
    wbufsize = 0  # each answer is written with one or two sendall calls, no buffering in between

    command: str | None = None
    path: str = ""
    _declared: int = 0  # the request's Content-Length
    _body_read: bool = False
    _answered: bool = False
    request_version: str = "HTTP/1.1"
    headers: Headers
    close_connection: bool = True

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            self._answered = False
            try:
                self.handle_one()
            except (TimeoutError, ConnectionError, OSError) as exc:  # the client went away or fell silent
                log.debug("inference api: connection closed (%s)", exc)
                return
            except Exception:  # noqa: BLE001 - a bug answers this request with a 500, and the connection closes
                log.exception("inference api: a request failed")
                if not self._answered:
                    try:
                        self.send_error(500, "the agent failed on this request", kind="internal")
                    except OSError:
                        pass
                return

    def finish(self) -> None:
        super().finish()
        if self._declared and not self._body_read:
            self._linger()

    def _linger(self) -> None:
        """The answer is out: shut the write side, then drop what the client still sends of the body it declared
        until it closes, ``LINGER_BYTES`` were dropped or ``LINGER_S`` passed, so that it reads the answer."""
        sock = self.connection
        left = min(self._declared, LINGER_BYTES)
        deadline = time.monotonic() + LINGER_S
        try:
            sock.shutdown(socket.SHUT_WR)
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                sock.settimeout(wait)
                data = sock.recv(min(left, 65536))
                if not data:
                    return
                left -= len(data)
        except OSError:  # the client closed or reset first, or fell silent: nothing more to do for it
            pass

    def handle_one(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            self.close_connection = True
            return
        self.headers = Headers()
        self.close_connection = True  # until the request says otherwise
        self._body_read, self._declared = False, 0
        try:
            if len(line) > MAX_REQUEST_LINE:
                raise HttpError(414, "request line too long")
            self._parse(line)
        except HttpError as exc:
            return self.send_error(exc.status, str(exc))
        self.dispatch()
        if not self._body_read and self._declared:  # a body nobody read cannot be told from the next request
            self.close_connection = True

    def _parse(self, line: bytes) -> None:
        parts = str(line, "iso-8859-1").rstrip("\r\n").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "bad request line")
        self.command, self.path, self.request_version = parts
        for _ in range(MAX_HEADERS + 1):
            raw = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(raw) > MAX_HEADER_LINE:
                raise HttpError(431, "header line too long")
            if raw in (b"\r\n", b"\n", b""):
                break
            text = str(raw, "iso-8859-1")
            name, sep, value = text.partition(":")
            if not sep or not name or not set(name) <= _TOKEN:  # folded lines, spaces before the colon (RFC 9112)
                raise HttpError(400, "malformed header line")
            if name.lower() in self.headers and name.lower() in ("content-length", "host", "transfer-encoding"):
                raise HttpError(400, f"{name} given twice")
            self.headers[name] = value.strip()
        else:
            raise HttpError(431, "too many headers")
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(501, "Transfer-Encoding is not taken here; send the body with a Content-Length")
        length = self.headers.get("Content-Length")
        if length is not None and not (length.isascii() and length.isdigit() and len(length) <= 18):
            raise HttpError(400, f"Content-Length {length[:20]!r} is not a byte count")
        self._declared = int(length) if length is not None else 0
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (self.request_version == "HTTP/1.0"
                                                          and connection != "keep-alive")
    def dispatch(self) -> None:
        raise NotImplementedError

    def on_error(self, kind: str) -> None:
        """A request refused before it reached the API (counted by the subclass)."""

    def body(self, limit: int, budget: BodyBudget | None = None) -> bytearray:
        """The request body by its Content-Length; HttpError 411 without one, 413 over ``limit``, 503 when the
        bodies being read on every connection would pass ``budget`` (the connection then closes: a body not read
        cannot be skipped). ``Expect: 100-continue`` is answered here, once the body is wanted and fits."""
        if self.headers.get("Content-Length") is None:
            raise HttpError(411, "Content-Length is required")
        n = self._declared
        if n > limit:
            raise HttpError(413, f"a body of {n:,} bytes; at most {limit:,}")
        if budget is not None and not budget.take(n):
            raise HttpError(503, f"{budget.used:,} bytes of request bodies are being read already; retry")
        try:
            if self.headers.get("Expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = read_exactly(self.rfile, n)
        finally:
            if budget is not None:
                budget.give(n)
        self._body_read = True
        return body

    def send(self, status: int, body: bytes, content_type: str, headers: list[str] | None = None) -> None:
        head = [f"HTTP/1.1 {status} {reason(status)}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", *(headers or ())]
        if not self._body_read and self._declared:
            self.close_connection = True  # the body was not read: the connection cannot carry another request
        if self.close_connection:
            head.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive")
        self._answered = True
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if len(body) < 65536:  # one write for a small answer; the head, then the body as it is (no copy)
            self.wfile.write(data + body)
        else:
            self.wfile.write(data)
            self.wfile.write(body)

    def send_error(self, status: int, message: str, kind: str = "bad_request") -> None:
        """A request that never reached the API: a JSON error, and the connection closes."""
        self.close_connection = True
        self.on_error(kind)
        rid = uuid.uuid4().hex
        self.send(status, json.dumps({"id": rid, "error": kind, "message": message}).encode(),
                  "application/json", [f"X-Request-Id: {rid}"])


class _Bounded:
    """Per connection one thread, at most ``connections`` of them; beyond, a 503 and the connection closes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, connections: threading.BoundedSemaphore,
                 refused: Callable[[], None], closed: Callable[[int], None]) -> None:
        self._slots, self._refused, self._closed = connections, refused, closed
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)  # type: ignore[call-arg]

    def close_connections(self) -> None:
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def process_request(self, request, client_address):  # noqa: ANN001
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            self._refused()
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:  # no thread to release the slot: release it here
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):  # noqa: ANN001
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            with self._open_lock:
                self._open.discard(request)
                left = len(self._open)
            self._slots.release()
            self._closed(left)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        log.warning("inference api: a connection failed", exc_info=True)  # not the stderr traceback socketserver prints


class UnixServer(_Bounded, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    pass


class TcpServer(_Bounded, socketserver.ThreadingMixIn, socketserver.TCPServer):
    pass


def clear_stale_socket(path: Path) -> None:
    """A socket file left by an agent that died: removed when nothing answers on it; anything else is refused."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another process is serving on it")
