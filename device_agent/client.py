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

import http.client
import io
import json
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    def __init__(self, socket_path: str | None = None, port: int | None = None, timeout: float = 30.0) -> None:
        if (socket_path is None) == (port is None):
            raise ValueError("give the agent's socket_path or its loopback port, one of them")
        self.socket_path, self.port, self.timeout = socket_path, port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = (_UnixConnection(self.socket_path, self.timeout) if self.socket_path is not None
                          else http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout))
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One exchange; retried on a fresh connection while nothing answered, until the timeout."""
        give_up = time.monotonic() + self.timeout
        pause = 0.05
        while True:
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers or {})
                r = conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                if r.status != 503:
                    return r.status, {k.lower(): v for k, v in r.getheaders()}, data
                retry = float(r.getheader("Retry-After") or 1)
                why = _message(data) or "the agent is busy"
            except (ConnectionError, FileNotFoundError, http.client.RemoteDisconnected, http.client.BadStatusLine,
                    socket.timeout, OSError) as exc:
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
            buf = io.BytesIO()
            np.save(buf, inputs, allow_pickle=False)
            body, headers["Content-Type"] = buf.getvalue(), NPY
        else:
            body = json.dumps({"inputs": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype),
                                              "data": np.asarray(v).ravel().tolist()}
                                          for k, v in inputs.items()}}).encode()
            headers["Content-Type"] = "application/json"
        status, h, data = self._request("POST", "/v1/infer", body, headers)
        if status != 200:
            raise _error(status, data)
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
