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
import uuid
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_LINE, MAX_HEADERS, MAX_HEADER_LINE = 65536, 100, 8192


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
    """``n`` bytes of the body into one buffer, read straight into it (a .npy image is used in place)."""
    body = bytearray(n)
    view, got = memoryview(body), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise ConnectionError(f"the request body ended after {got} of {n} bytes")
        got += k
    return body


class Handler(socketserver.StreamRequestHandler):
    """One connection: requests one after the other until either side closes. Subclasses give ``routes``:
    ``{(method, path): bound method name}``, and ``not_found``."""

    timeout = 60  # an idle keep-alive connection is closed after a minute
    rbufsize = 256 * 1024  # a 224x224x3 float32 body is 600 KB: read in few calls, not 8 KB ones
    wbufsize = 0  # each answer is written with one or two sendall calls, no buffering in between

    command: str | None = None
    path: str = ""
    request_version: str = "HTTP/1.1"
    headers: Headers
    close_connection: bool = True

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            try:
                self.handle_one()
            except (TimeoutError, ConnectionError, OSError) as exc:  # the client went away or fell silent
                log.debug("inference api: connection closed (%s)", exc)
                return

    def handle_one(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            self.close_connection = True
            return
        self.headers = Headers()
        self.close_connection = True  # until the request says otherwise
        try:
            if len(line) > MAX_REQUEST_LINE:
                raise HttpError(414, "request line too long")
            self._parse(line)
        except HttpError as exc:
            return self.send_error(exc.status, str(exc))
        self.dispatch()

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
            name, sep, value = str(raw, "iso-8859-1").partition(":")
            if not sep:
                raise HttpError(400, "malformed header line")
            self.headers[name.strip()] = value.strip()
        else:
            raise HttpError(431, "too many headers")
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (self.request_version == "HTTP/1.0"
                                                          and connection != "keep-alive")
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def dispatch(self) -> None:
        raise NotImplementedError

    def body(self, limit: int) -> bytearray:
        """The request body by its Content-Length; HttpError 411 without one, 413 over ``limit`` (the connection
        then closes: a body not read cannot be skipped)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise HttpError(411, "Content-Length is required")
        if int(length) > limit:
            self.close_connection = True
            raise HttpError(413, f"a body of {int(length):,} bytes; at most {limit:,}")
        return read_exactly(self.rfile, int(length))

    def send(self, status: int, body: bytes, content_type: str, headers: list[str] | None = None) -> None:
        head = [f"HTTP/1.1 {status} {reason(status)}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", *(headers or ())]
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if len(body) < 65536:  # one write for a small answer; the head, then the body as it is (no copy)
            self.wfile.write(data + body)
        else:
            self.wfile.write(data)
            self.wfile.write(body)

    def send_error(self, status: int, message: str) -> None:
        """A request that never reached the API: a JSON error, and the connection closes."""
        self.close_connection = True
        rid = uuid.uuid4().hex
        self.send(status, json.dumps({"id": rid, "error": "bad_request", "message": message}).encode(),
                  "application/json", [f"X-Request-Id: {rid}"])


class _Bounded:
    """Per connection one thread, at most ``connections`` of them; beyond, a 503 and the connection closes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, connections: threading.BoundedSemaphore,
                 refused: Callable[[], None], closed: Callable[[], None]) -> None:
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
            self._slots.release()
            self._closed()

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
