"""The local inference API: the device's applications call the active model through the agent.

HTTP/1.1 on a Unix domain socket (permissions 0660: the device's app group) and, optionally, a loopback TCP port:

- ``POST /v1/infer``: a JSON body ``{"inputs": {NAME: TENSOR}}`` where a tensor is a nested list, or
  ``{"data": [...], "shape": [...], "dtype": "float32"}`` (data flat or nested); or a raw ``.npy`` body
  (``Content-Type: application/x-npy``) for a model of one input. The answer is JSON
  ``{"id", "model", "version", "outputs": {NAME: {"shape", "dtype", "data"}}, "latency_ms"}``, or the first
  output as ``.npy`` (named by ``X-Output-Name``) when the request says ``Accept: application/x-npy`` and the
  model has one output. Every answer carries ``X-Request-Id``
  (the caller's, or one made up) and ``X-Model-Version`` (the version that answered).
- ``GET /v1/model``: name, version, inputs and outputs (names, shapes, dtypes), the preprocessing spec and the
  class names when the manifest carries them. ``GET /v1/health``: 200 with a model, 503 without.

Bounded everywhere: ``workers`` inferences at once, at most ``queue`` more waiting (beyond: 503 with
``Retry-After``), a deadline per request (``X-Deadline-Ms``, else ``deadline_ms``; past it while waiting: 504),
``max_connections`` connections (beyond: 503), bodies of at most ``max_body_bytes`` (413). An input of the wrong
name, shape or dtype is a 400 naming the input and what the model expects.

Swaps never fail a request: ``ModelHolder.swap`` makes the new model the one new requests take; a request that
took the old one finishes on it, and the old one is released when the last of them returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from . import httpd
from .drift import top1_classes
from .feeds import NPY, RequestError, parse_feeds
from .heap import release_free_memory
from .npy import write_npy
from .quality import BUCKETS_MS, LiveAccuracy
from .runtimes import Session

log = logging.getLogger(__name__)

ERROR_KINDS = ("bad_request", "too_large", "overloaded", "deadline", "no_model", "runtime", "internal")
#: a feedback body is an id and a label
MAX_FEEDBACK_BYTES = 4096
TRIM_EVERY_S = 10.0


# --------------------------------------------------------------------------- the model requests run on

@dataclass
class Served:
    """A loaded model and what describes it; ``release`` runs once, when it is swapped out and idle."""

    session: Session
    name: str
    version: int | None
    describe: dict[str, Any] = field(default_factory=dict)  # extra /v1/model fields (preprocess, labels)
    release: Callable[[], None] | None = None
    inflight: int = 0
    retired: bool = False
    monitor: Any = None  # a device_agent.drift.DriftMonitor of this version's live inputs, when it has a reference


class ModelHolder:
    """The model new requests take, swapped atomically; a swapped-out model lives until its requests are done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Served | None = None

    @property
    def current(self) -> Served | None:
        return self._current

    def acquire(self) -> Served | None:
        with self._lock:
            served = self._current
            if served is not None:
                served.inflight += 1
            return served

    def release(self, served: Served) -> None:
        with self._lock:
            served.inflight -= 1
            done = served.retired and served.inflight == 0
        if done:
            self._free(served)

    def swap(self, new: Served | None) -> Served | None:
        """``new`` answers every request from now on; the previous model is released once idle."""
        with self._lock:
            old, self._current = self._current, new
            if old is not None:
                old.retired = True
            idle = old is not None and old.inflight == 0
        if idle:
            self._free(old)
        return old

    @staticmethod
    def _free(served: Served) -> None:
        if served.release is not None:
            try:
                served.release()
            except Exception:  # noqa: BLE001 - releasing must never take the server down
                log.exception("releasing v%s failed", served.version)


# --------------------------------------------------------------------------- traffic statistics

class TrafficStats:
    """Per model version: a latency histogram over BUCKETS_MS (mergeable), requests, errors by kind; rejected
    requests and the queue's depth. ``snapshot`` is what the agent reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, Any]] = {}
        self.rejected = 0
        self.queue_depth = 0
        self.queue_peak = 0

    #: versions kept (the oldest goes first): the active one, the one it replaced, a few before
    MAX_VERSIONS = 4

    def _of(self, version: int | None) -> dict[str, Any]:
        key = str(version)
        if key not in self._versions:
            if len(self._versions) >= self.MAX_VERSIONS:
                del self._versions[next(iter(self._versions))]
            self._versions[key] = {"buckets": [0] * (len(BUCKETS_MS) + 1), "count": 0, "sum_ms": 0.0,
                                   "errors": {k: 0 for k in ERROR_KINDS}}
        return self._versions[key]

    def observe(self, version: int | None, ms: float) -> None:
        with self._lock:
            v = self._of(version)
            i = next((k for k, bound in enumerate(BUCKETS_MS) if ms <= bound), len(BUCKETS_MS))
            v["buckets"][i] += 1
            v["count"] += 1
            v["sum_ms"] += ms

    def error(self, version: int | None, kind: str) -> None:
        with self._lock:
            self._of(version)["errors"][kind] += 1
            if kind == "overloaded":
                self.rejected += 1

    def queued(self, delta: int) -> None:
        with self._lock:
            self.queue_depth += delta
            self.queue_peak = max(self.queue_peak, self.queue_depth)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            versions = json.loads(json.dumps(self._versions))
            return {"buckets_ms": list(BUCKETS_MS), "versions": versions, "rejected": self.rejected,
                    "queue_depth": self.queue_depth, "queue_peak": self.queue_peak}


def quantile_ms(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile from a histogram over BUCKETS_MS: the upper bound of the bucket it falls in (the last
    finite bound for the overflow bucket), a conservative figure; Prometheus' histogram_quantile interpolates
    within the bucket instead, so it reads a little lower."""
    total = sum(buckets)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return BUCKETS_MS[min(i, len(BUCKETS_MS) - 1)]
    return BUCKETS_MS[-1]


# --------------------------------------------------------------------------- the server

@dataclass(frozen=True)
class ServeConfig:
    socket_path: Path | None = None
    tcp_port: int | None = None  # loopback only; 0 picks a free port
    workers: int = 2
    queue: int = 32
    deadline_ms: float = 10_000.0
    max_connections: int = 64
    max_body_bytes: int = 32 * 2**20
    socket_mode: int = 0o660


class Gate:
    """``workers`` at a time, at most ``queue`` waiting; a wait past the deadline gives up."""

    def __init__(self, workers: int, queue: int, stats: TrafficStats) -> None:
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._waiting, self._queue, self._stats = 0, queue, stats

    def enter(self, deadline: float) -> None:
        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            if self._waiting >= self._queue:
                raise RequestError(503, "overloaded", f"{self._waiting} requests waiting already; retry",
                                   retry_after=1)
            self._waiting += 1
        self._stats.queued(+1)
        try:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RequestError(504, "deadline", "the deadline passed while the request waited for a worker")
        finally:
            with self._lock:
                self._waiting -= 1
            self._stats.queued(-1)

    def leave(self) -> None:
        self._slots.release()


class InferenceServer:
    """The API over a ModelHolder, on a Unix socket and/or a loopback port; ``start`` / ``stop``."""

    def __init__(self, holder: ModelHolder, config: ServeConfig, stats: TrafficStats | None = None) -> None:
        self.holder, self.cfg = holder, config
        self.stats = stats or TrafficStats()
        self.gate = Gate(config.workers, config.queue, self.stats)
        self._connections = threading.BoundedSemaphore(config.max_connections)
        self._servers: list[httpd.UnixServer | httpd.TcpServer] = []
        self._threads: list[threading.Thread] = []
        self.tcp_address: tuple[str, int] | None = None
        self.accuracy = LiveAccuracy()  # answers waiting for the application's feedback (POST /v1/feedback)
        # request bodies read at once over every connection: two of the largest (more wait with a 503)
        self.bodies = httpd.BodyBudget(2 * config.max_body_bytes)
        self._trimmed = -TRIM_EVERY_S
        self.shadow: Any = None  # a device_agent.shadow.ShadowRunner while a candidate is shadowed

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "InferenceServer":
        handler = _handler(self)
        # a refused connection is counted; a closed one hands back what its thread's malloc arena holds
        bounds = (self._connections, lambda: self.stats.error(None, "overloaded"), self._trim)
        if self.cfg.socket_path is not None:
            path = Path(self.cfg.socket_path)
            httpd.clear_stale_socket(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            server = httpd.UnixServer(str(path), handler, *bounds)
            os.chmod(path, self.cfg.socket_mode)
            self._servers.append(server)
        if self.cfg.tcp_port is not None:
            server = httpd.TcpServer(("127.0.0.1", self.cfg.tcp_port), handler, *bounds)
            self.tcp_address = server.server_address[:2]
            self._servers.append(server)
        for server in self._servers:
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                                 name="inference-api")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (an agent that stops answers no one)."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()  # type: ignore[attr-defined]
        for t in self._threads:
            t.join(timeout=5)
        if self.cfg.socket_path is not None:
            try:
                Path(self.cfg.socket_path).unlink()
            except FileNotFoundError:
                pass
        self._servers, self._threads = [], []

    def __enter__(self) -> "InferenceServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests -----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        served = self.holder.current
        if served is None:
            raise RequestError(503, "no_model", "no model is active on this device yet")
        specs = lambda xs: [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in xs]  # noqa: E731
        return {"name": served.name, "version": served.version, "inputs": specs(served.session.inputs),
                "outputs": specs(served.session.outputs), **served.describe}

    def infer(self, body: bytes, content_type: str, deadline_ms: float | None
              ) -> tuple[Served, dict[str, Any], list, float]:
        """Run one request: (the model that answered, its feeds, its outputs, ms). Raises RequestError."""
        deadline = time.monotonic() + (deadline_ms if deadline_ms is not None else self.cfg.deadline_ms) / 1e3
        try:
            self.gate.enter(deadline)
        except RequestError as exc:
            current = self.holder.current
            self.stats.error(current.version if current is not None else None, exc.kind)
            exc.counted = True
            raise
        try:
            served = self.holder.acquire()
            if served is None:
                self.stats.error(None, "no_model")
                exc = RequestError(503, "no_model", "no model is active on this device yet", retry_after=5)
                exc.counted = True
                raise exc
            try:
                feeds = parse_feeds(body, content_type, served.session)
                t0 = time.perf_counter()
                try:
                    outputs = served.session.run(feeds)
                except Exception as exc:  # noqa: BLE001 - a runtime failure answers this request, nothing more
                    self.stats.error(served.version, "runtime")
                    failed = RequestError(500, "runtime", f"the model failed on this input: "
                                                          f"{type(exc).__name__}: {str(exc)[:200]}")
                    failed.counted = True
                    raise failed from None
                ms = (time.perf_counter() - t0) * 1e3
                if time.monotonic() > deadline:
                    self.stats.error(served.version, "deadline")
                    late = RequestError(504, "deadline", f"the answer came {ms:.1f} ms later, past the deadline")
                    late.counted = True
                    raise late
                self.stats.observe(served.version, ms)
                return served, feeds, outputs, ms
            except RequestError as exc:
                if not exc.counted:
                    self.stats.error(served.version, exc.kind)
                    exc.counted = True
                raise
            finally:
                self.holder.release(served)
        finally:
            self.gate.leave()


    def _trim(self, still_open: int) -> None:
        """A connection closed: the bodies its thread held go back to the kernel when it was the last one open, or
        at most every TRIM_EVERY_S (malloc_trim takes glibc's heap locks for ~2 ms on a fragmented heap; one-shot
        clients close often)."""
        now = time.monotonic()
        if still_open == 0 or now - self._trimmed >= TRIM_EVERY_S:
            self._trimmed = now
            release_free_memory()

    def answering(self, served: Served, rid: str, outputs: list) -> None:
        """Before the answer goes out: its top-1 class waits for the application's feedback (so feedback sent
        the moment the answer arrives finds it)."""
        top = top1_classes(outputs[0] if outputs else None)
        if top is not None and len(top) == 1:
            self.accuracy.answered(rid, served.version, int(top[0]))

    def answered(self, served: Served, rid: str, feeds: dict[str, Any], outputs: list, ms: float) -> None:
        """After the answer went out: the drift monitor, the shadow. Never raises (a failure here is logged;
        the application already has its answer)."""
        try:
            if served.monitor is not None and served.session.inputs:
                served.monitor.observe(feeds.get(served.session.inputs[0].name), outputs[0] if outputs else None)
            shadow = self.shadow
            if shadow is not None:
                shadow.offer(rid, feeds, outputs, ms, served.version)
        except Exception:  # noqa: BLE001 - nothing after the answer may take the connection down
            log.exception("inference api: after answering %s", rid)

    def feedback(self, body: bytes) -> dict[str, Any]:
        """``{"id": REQUEST_ID, "label": CLASS INDEX or NAME}``: the truth for a request answered earlier."""
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "bad_request", 'expected JSON {"id": REQUEST_ID, "label": CLASS}') from None
        rid, label = (doc.get("id"), doc.get("label")) if isinstance(doc, dict) else (None, None)
        if not isinstance(rid, str) or not 0 < len(rid) <= 128:
            raise RequestError(400, "bad_request", 'expected {"id": REQUEST_ID, "label": CLASS}: the id of an '
                                                   "answered request (its X-Request-Id)")
        served = self.holder.current
        names = list(served.describe.get("labels") or ()) if served is not None else []
        if isinstance(label, str) and label in names:
            label = names.index(label)
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            known = f"; or one of the model's labels ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" \
                if names else ""
            raise RequestError(400, "bad_request", f"label {str(label)[:40]!r}: a class index{known}")
        correct = self.accuracy.feedback(rid, label)
        return {"id": rid, "matched": correct is not None, "correct": correct or {}}


def _handler(api: InferenceServer) -> type[httpd.Handler]:
    class Handler(httpd.Handler):
        def dispatch(self) -> None:
            given = self.headers.get("X-Request-Id", "")
            rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
            try:
                if self.command == "POST" and self.path == "/v1/infer":
                    return self.infer(rid)
                if self.command == "POST" and self.path == "/v1/feedback":
                    return self._json(200, api.feedback(self._body(MAX_FEEDBACK_BYTES)), rid)
                if self.command == "GET" and self.path == "/v1/health":
                    served = api.holder.current
                    if served is None:
                        raise RequestError(503, "no_model", "no model is active on this device yet")
                    return self._json(200, {"status": "ok", "model": served.name, "version": served.version},
                                      rid, version=served.version)
                if self.command == "GET" and self.path == "/v1/model":
                    doc = api.describe()
                    return self._json(200, doc, rid, version=doc["version"])
                if self.command in ("GET", "POST"):
                    raise RequestError(404, "bad_request", f"no such endpoint: {self.path[:80]}")
                raise RequestError(405, "bad_request", f"method {str(self.command)[:20]} not allowed; GET or POST")
            except RequestError as exc:
                self._fail(exc, rid)

        def on_error(self, kind: str) -> None:
            api.stats.error(None, kind)

        def _body(self, limit: int | None = None) -> bytearray:
            try:
                return self.body(limit or api.cfg.max_body_bytes, api.bodies)
            except httpd.HttpError as exc:
                kind = {413: "too_large", 503: "overloaded"}.get(exc.status, "bad_request")
                raise RequestError(exc.status, kind, str(exc), retry_after=1 if exc.status == 503 else None) \
                    from None

        def infer(self, rid: str) -> None:
            try:
                body = self._body()
                deadline = self.headers.get("X-Deadline-Ms")
                try:
                    deadline_ms = float(deadline) if deadline is not None else None
                except ValueError:
                    raise RequestError(400, "bad_request", f"X-Deadline-Ms {deadline[:20]!r} is not a number") \
                        from None
                if deadline_ms is not None and not 0 < deadline_ms <= 3_600_000:
                    raise RequestError(400, "bad_request", "X-Deadline-Ms must be in (0, 3600000]")
                served, feeds, outputs, ms = api.infer(body, self.headers.get("Content-Type", "application/json"),
                                                       deadline_ms)
            except RequestError as exc:
                return self._fail(exc, rid)
            api.answering(served, rid, outputs)
            try:
                self._answer(served, rid, outputs, ms)
            finally:
                api.answered(served, rid, feeds, outputs, ms)

        def _answer(self, served: Served, rid: str, outputs: list, ms: float) -> None:
            if NPY in self.headers.get("Accept", "") and len(outputs) == 1:
                return self._send(200, write_npy(outputs[0]), NPY, rid, version=served.version, latency_ms=ms,
                                  output=served.session.outputs[0].name)
            names = [s.name for s in served.session.outputs]
            doc = {"id": rid, "model": served.name, "version": served.version, "latency_ms": round(ms, 4),
                   "outputs": {n: {"shape": list(o.shape), "dtype": str(o.dtype), "data": o.tolist()}
                               for n, o in zip(names, outputs)}}
            try:
                self._json(200, doc, rid, version=served.version)
            except ValueError:  # a NaN or infinity in an output: JSON cannot carry it
                self._fail(RequestError(500, "runtime", "the output holds NaN or infinity; ask for "
                                                        f"Accept: {NPY}"), rid)

        def _send(self, status: int, body: bytes, content_type: str, rid: str, version: Any = None,
                  retry_after: float | None = None, latency_ms: float | None = None,
                  output: str | None = None) -> None:
            head = [f"X-Request-Id: {rid}"]
            if version is not None:
                head.append(f"X-Model-Version: {version}")
            if latency_ms is not None:
                head.append(f"X-Latency-Ms: {latency_ms:.4f}")
            if output is not None and output.isascii() and output.isprintable() and len(output) <= 256:
                head.append(f"X-Output-Name: {output}")
            if retry_after is not None:
                head.append(f"Retry-After: {int(math.ceil(retry_after))}")
            self.send(status, body, content_type, head)

        def _json(self, status: int, doc: dict[str, Any], rid: str, **kw: Any) -> None:
            self._send(status, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(),
                       "application/json", rid, **kw)

        def _fail(self, exc: RequestError, rid: str) -> None:
            if not exc.counted:  # refused before a model was picked (a path, a header, a body): no version
                api.stats.error(None, exc.kind)
            self._json(exc.status, {"id": rid, "error": exc.kind, "message": str(exc)}, rid,
                       retry_after=exc.retry_after)

    return Handler
