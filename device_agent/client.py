"""A client for the agent's local inference API (device_agent.serving), standard library and numpy only.

    from device_agent.client import Client
    client = Client("/run/edgefleet/infer.sock")       # or Client(port=8750) for the loopback port
    answer = client.infer({"input": image[None]})     # numpy arrays by input name (or one array)
    answer.outputs["logits"], answer.version, answer.id

One keep-alive connection, opened again when the agent restarted or closed it: ``infer`` retries a request
that never reached a model (the connection refused or reset before an answer, a 503) until ``timeout``
passes, then raises ``Unavailable``; an answer the agent gave (400, 500, 504) raises ``InferenceError`` at
once with its status and message.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from .npy import npy_parts, read_npy

#: the request side's socket buffer (the kernel caps it at net.core.wmem_max)
SEND_BUFFER = 4 * 2**20

NPY = "application/x-npy"


class InferenceError(Exception):
    """The agent answered, with an error: ``status`` (400 bad input, 413, 500, 504 deadline), ``kind``."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind = status, kind


class Unavailable(InferenceError):
    """No answer within the client's timeout: the agent is not running, restarting, or overloaded."""


@dataclass(frozen=True)
class Answer:
    id: str
    version: int | None
    outputs: dict[str, np.ndarray]
    latency_ms: float | None


class _Connection:
    """One HTTP/1.1 keep-alive connection, just what the agent's API speaks: a request written in one go, an
    answer read by its Content-Length (http.client's header parsing through the email package was a third of a
    small request's cost)."""

    def __init__(self, socket_path: str | None, port: int | None, timeout: float) -> None:
        if socket_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = socket_path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = ("127.0.0.1", port)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except BaseException:
            self.sock.close()
            raise
        if socket_path is not None:  # a 600 KB image in the socket at once, not in three rounds of wake-ups
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.reader = self.sock.makefile("rb", 256 * 1024)
        self.exchanges = 0

    def exchange(self, method: str, path: str, body: bytes | tuple[bytes, memoryview] | None,
                 headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One request and its answer; ``body`` may come in parts (a .npy header and the array's own memory),
        written with one ``sendmsg`` where the kernel takes them, never joined into a copy. Raises _NotSent when
        the request cannot have been taken (the agent closed before it was all written and said nothing), _Lost
        when it was written and no answer came (``idle``: not a byte of one, on a connection that had answered
        before: the agent closed it while idle and never saw this request)."""
        parts = [p for p in ((body,) if isinstance(body, bytes) else body or ()) if len(p)]
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {sum(len(p) for p in parts)}",
                *(f"{k}: {v}" for k, v in headers.items())]
        reused, self.exchanges = self.exchanges > 0, self.exchanges + 1
        try:
            _send_all(self.sock, [("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), *parts])
        except OSError as exc:  # the agent closed first: it may have said why (a 413, a 503) before it did
            try:
                return self._answer()
            except (OSError, ValueError):
                raise _NotSent(f"{type(exc).__name__}: {exc}") from None
        try:
            return self._answer()
        except _Silent as exc:
            raise _Lost(str(exc), idle=reused) from None
        except (OSError, ValueError) as exc:
            raise _Lost(f"{type(exc).__name__}: {exc}", idle=False) from None

    def _answer(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.reader.readline(65537)
        if not status_line:
            raise _Silent("the connection closed before any answer")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError(f"no HTTP answer ({status_line[:40]!r})")
        answer: dict[str, str] = {}
        while True:
            line = self.reader.readline(65537)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("the connection closed in the answer's headers")
            name, _, value = line.decode("latin-1").partition(":")
            answer[name.strip().lower()] = value.strip()
        length = answer.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            raise ConnectionError(f"an answer of Content-Length {length[:20]!r}")
        payload = self.reader.read(int(length))
        if len(payload) != int(length):
            raise ConnectionError("the connection closed in the answer's body")
        return int(parts[1]), answer, payload

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class _Silent(ConnectionError):
    """EOF where an answer's first byte should be."""


class _NotSent(ConnectionError):
    """The request did not reach the agent whole: sending it again is safe."""


class _Lost(ConnectionError):
    """The request was written and no answer came: the model may have run."""

    def __init__(self, message: str, idle: bool) -> None:
        super().__init__(message)
        self.idle = idle


def _send_all(sock: socket.socket, parts: list) -> None:
    views = [memoryview(p) for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


class Client:
    def __init__(self, socket_path: str | None = None, port: int | None = None, timeout: float = 30.0) -> None:
        if (socket_path is None) == (port is None):
            raise ValueError("give the agent's socket_path or its loopback port, one of them")
        self.socket_path, self.port, self.timeout = socket_path, port, timeout
        self._conn: _Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | tuple[bytes, memoryview] | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One exchange, sent again (on a fresh connection, backing off, until the timeout) only where the agent
        cannot have taken it: nobody to connect to (an agent restarting), a send cut short with no answer, an
        idle keep-alive connection the agent had closed, or a 503 (busy; with Retry-After). A request written
        whole whose answer was lost is not sent again (the model may have run): that is an InferenceError."""
        give_up = time.monotonic() + self.timeout
        pause = 0.05
        while True:
            try:
                if self._conn is None:
                    self._conn = _Connection(self.socket_path, self.port, self.timeout)
                status, answer, data = self._conn.exchange(method, path, body, headers or {})
                if answer.get("connection", "").lower() == "close":
                    self.close()
                if status != 503:
                    return status, answer, data
                try:
                    retry = float(answer.get("retry-after") or 1)
                except ValueError:
                    retry = 1.0
                why = _message(data) or "the agent is busy"
            except _Lost as exc:
                self.close()
                if not exc.idle:
                    raise InferenceError(502, "lost", f"the request was sent and its answer lost ({exc}); not "
                                                      "sent again: the model may have run it") from None
                retry, why = 0.0, str(exc)  # the agent closed an idle connection: this request never reached it
            except (OSError, ValueError) as exc:  # refused, no socket yet, a send cut short: connect again
                self.close()
                retry, why = pause, f"{type(exc).__name__}: {exc}"
                pause = min(pause * 2, 1.0)
            if time.monotonic() + retry > give_up:
                raise Unavailable(503, "unavailable", f"no answer within {self.timeout:g} s ({why})")
            time.sleep(retry)  # a back-off before the retry, not a synchronisation

    def infer(self, inputs: dict[str, np.ndarray] | np.ndarray, deadline_ms: float | None = None,
              request_id: str | None = None) -> Answer:
        rid = request_id or uuid.uuid4().hex
        headers = {"X-Request-Id": rid}
        if deadline_ms is not None:
            headers["X-Deadline-Ms"] = str(deadline_ms)
        if isinstance(inputs, np.ndarray):
            body, headers["Content-Type"] = npy_parts(inputs), NPY
        else:
            body = json.dumps({"inputs": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype),
                                              "data": np.asarray(v).ravel().tolist()}
                                          for k, v in inputs.items()}}).encode()
            headers["Content-Type"] = "application/json"
        headers["Accept"] = f"{NPY}, application/json"  # .npy back from a model of one output: no JSON floats
        status, h, data = self._request("POST", "/v1/infer", body, headers)
        if status != 200:
            raise _error(status, data)
        version = h.get("x-model-version")
        version = int(version) if version is not None and version.lstrip("-").isdigit() else None
        if h.get("content-type", "").startswith(NPY):
            latency = h.get("x-latency-ms")
            return Answer(h.get("x-request-id", rid), version,
                          {h.get("x-output-name", "output"): read_npy(data)},
                          float(latency) if latency else None)
        doc = json.loads(data)
        outputs = {k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for k, v in doc["outputs"].items()}
        return Answer(doc["id"], doc.get("version"), outputs, doc.get("latency_ms"))

    def model(self) -> dict[str, Any]:
        status, _, data = self._request("GET", "/v1/model")
        if status != 200:
            raise _error(status, data)
        return json.loads(data)

    def health(self) -> dict[str, Any]:
        status, _, data = self._request("GET", "/v1/health")
        if status != 200:
            raise _error(status, data)
        return json.loads(data)


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", ""))
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace")


def _error(status: int, data: bytes) -> InferenceError:
    try:
        doc = json.loads(data)
        return InferenceError(status, str(doc.get("error")), str(doc.get("message")))
    except (ValueError, AttributeError):
        return InferenceError(status, "http", data[:200].decode("utf-8", "replace"))
