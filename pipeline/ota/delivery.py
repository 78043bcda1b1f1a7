"""Deliver one signed artifact to a set of devices and wait for each one's verdict.

The host publishes the job (retained), serves the chunks each device asks for, and collects
status and metrics. A wave of more than one device is broadcast (pipeline.ota.broadcast): every chunk is
published once on the job's artifact topic, and what a device still lacks is served to it alone. A device's terminal state is its delivery status (``DeviceStatus``: activated |
rolled_back | failed), or timeout when it reached no verdict in time.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.errors import ProtocolError
from device_agent.protocol import (
    TERMINAL_STATES, Event, Job, Leaf, Metrics, State, Status, StreamGet, artifact_topic, encode, encode_chunk,
    parse_topic, topic,
)

from ..bundle import Artifact
from .broadcast import (
    SUBSCRIBE_WAIT_S, BroadcastMode, BroadcastResult, broadcast_chunks, clear_retained, use_broadcast,
)
from .status import DeviceStatus
from .watch import Watch

log = logging.getLogger(__name__)


@dataclass
class DeviceResult:
    device_id: str
    #: a DeviceStatus; after a shadow stage that stopped the rollout, DeviceStatus.SHADOW_DROPPED
    status: enum.Enum = DeviceStatus.TIMEOUT
    active_version: int | None = None
    reason: str | None = None
    result_code: int | None = None
    metrics: dict[str, Any] | None = None
    chunks_served: int = 0
    chunks_resent: int = 0
    bytes_sent: int = 0
    states: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: the state in the last status the device published (after a rollback command: where it stands then)
    device_state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "status": self.status.value, "active_version": self.active_version,
                "reason": self.reason, "result_code": self.result_code, "metrics": self.metrics,
                "chunks_served": self.chunks_served, "chunks_resent": self.chunks_resent,
                "bytes_sent": self.bytes_sent, "states": self.states, "events": self.events,
                "device_state": self.device_state}


class Delivery(list):
    """A delivery's :class:`DeviceResult` list, with what the wave cost the host: ``broadcast`` (None when unicast)
    and ``egress_bytes``, the chunk frames the host published, broadcast and per device together."""

    broadcast: BroadcastResult | None = None

    @property
    def egress_bytes(self) -> int:
        return (self.broadcast.bytes_sent if self.broadcast else 0) + sum(r.bytes_sent for r in self)

    def summary(self) -> dict[str, Any]:
        b = self.broadcast
        return {"mode": "broadcast" if b else "unicast", "egress_bytes": self.egress_bytes,
                "broadcast_bytes": b.bytes_sent if b else 0, "broadcast_chunks": b.chunks if b else 0,
                "repair_bytes": sum(r.bytes_sent for r in self), "subscribed": b.subscribed if b else None}


#: a chunk sent this recently is not sent again on a plain request: it may still be queued for the device
RESEND_AFTER_S = 3.0
_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)


def publish_job(link, prefix: str, devices: list[str], job_id: str, artifact: Artifact,
                broadcast_topic: str | None = None) -> None:
    """The signed manifest on each device's job topic, retained: a device that connects later still gets it.
    ``broadcast_topic``: the wave's artifact topic, which the devices subscribe to."""
    payload = Job(job_id, artifact.envelope, broadcast_topic).to_bytes()
    for device_id in devices:
        link.publish(topic(prefix, device_id, Leaf.JOB), payload, qos=1, retain=True)


class ChunkServer:
    """Serves one job's chunks as devices ask for them (``stream/get``), on its own thread: the network thread only
    queues the requests (:meth:`request`). ``counters``: device id -> an object whose ``chunks_served``,
    ``chunks_resent`` and ``bytes_sent`` it counts up."""

    def __init__(self, link, prefix: str, artifact: Artifact, job_id: str, counters: dict[str, Any],
                 requests: queue.Queue[tuple[str, StreamGet]] | None = None) -> None:
        self.link, self.prefix, self.artifact, self.job_id, self.counters = link, prefix, artifact, job_id, counters
        self.requests: queue.Queue[tuple[str, StreamGet]] = requests if requests is not None else queue.Queue()
        self._stop = threading.Event()
        self._sent_at: dict[str, dict[int, float]] = {d: {} for d in counters}
        self._thread = threading.Thread(target=self._serve, name="chunk-server", daemon=True)

    def request(self, device_id: str, req: StreamGet) -> None:
        if req.job_id == self.job_id and device_id in self.counters:
            self.requests.put((device_id, req))

    def start(self) -> "ChunkServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _serve(self) -> None:
        chunk_size, prefix, link, job_id = self.artifact.manifest.chunk_size, self.prefix, self.link, self.job_id
        with open(self.artifact.model_path, "rb") as f:
            while not self._stop.is_set():
                try:
                    device_id, req = self.requests.get(timeout=0.2)
                except queue.Empty:
                    continue
                r, last = self.counters[device_id], self._sent_at[device_id]
                for index in req.chunks:
                    if index >= self.artifact.manifest.chunks:
                        link.publish(topic(prefix, device_id, Leaf.STREAM_REJECTED),
                                     encode({"job_id": job_id, "reason": f"chunk {index} out of range"}))
                        break
                    now = time.monotonic()
                    if not req.resend and now - last.get(index, -1e9) < RESEND_AFTER_S:
                        continue
                    f.seek(index * chunk_size)
                    frame = encode_chunk(job_id, index, f.read(chunk_size))
                    link.publish(topic(prefix, device_id, Leaf.STREAM_DATA), frame, qos=1)
                    r.chunks_served += 1
                    r.bytes_sent += len(frame)
                    if index in last:
                        r.chunks_resent += 1
                    last[index] = now


def deliver(
    broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
    progress: Callable[[str, DeviceResult], None] | None = None, until: enum.Enum = DeviceStatus.ACTIVATED,
    broadcast: BroadcastMode | str | None = None, subscribe_wait_s: float = SUBSCRIBE_WAIT_S,
) -> Delivery:
    """``until``: the status whose value is the agent state that ends a device's delivery well: ``activated`` (then
    its metrics of the new version are waited for too), or for a shadow job ``shadowing`` (pipeline.ota.shadow);
    the agent's terminal states end it as well. ``broadcast``: a :class:`BroadcastMode` (None: the one in effect,
    ``auto`` unless :func:`pipeline.ota.broadcast.broadcasting` says otherwise); a broadcast waits up to
    ``subscribe_wait_s`` for the devices to subscribe (their ``downloading`` status), then publishes each chunk
    once, while the devices' own requests are served as ever."""
    job_id = f"j{artifact.version}-{uuid.uuid4().hex[:8]}"
    wide = use_broadcast(broadcast, len(devices)) and not artifact.manifest.url
    delivery = Delivery()
    delivery.broadcast = BroadcastResult() if wide else None
    results = {d: DeviceResult(d) for d in devices}
    done: set[str] = set()  # devices with their verdict (and, after an activation, their metrics)
    requests: queue.Queue[tuple[str, StreamGet]] = queue.Queue()
    offline: set[str] = set()  # devices whose retained online flag says offline: a broadcast does not wait for them

    def on_message(name: str, payload: bytes) -> None:
        try:
            device_id, leaf = parse_topic(prefix, name)
        except ProtocolError:
            return
        r = results.get(device_id)
        if r is None or not payload:
            return
        try:
            if leaf is Leaf.ONLINE:
                (offline.discard if payload == b"online" else offline.add)(device_id)
            elif leaf is Leaf.STREAM_GET:
                req = StreamGet.parse(payload)
                if req.job_id == job_id:
                    requests.put((device_id, req))
            elif leaf is Leaf.STATUS:
                st = Status.parse(payload)
                if st.job_id != job_id:
                    return
                if not r.states or r.states[-1] != st.state:
                    r.states.append(st.state)
                r.device_state = st.state
                r.active_version, r.reason, r.result_code = st.active_version, st.reason, st.result_code
                if st.state == until.value and until is not DeviceStatus.ACTIVATED:
                    r.status = until
                    done.add(device_id)
                elif st.state in _TERMINAL:
                    r.status = DeviceStatus(st.state)
                    if st.state != State.ACTIVATED.value:  # no metrics follow a refusal or rollback
                        done.add(device_id)
                if progress is not None:
                    progress(st.state, r)
            elif leaf is Leaf.METRICS:
                m = Metrics.parse(payload)
                if r.status is DeviceStatus.ACTIVATED and m.version == artifact.version:
                    r.metrics = {k: getattr(m, k) for k in (
                        "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "throughput_ips", "rss_mb", "runs",
                        "cpu_percent", "temperature_c", "energy_mj", "energy_source", "slot", "emulated", "errors",
                        "uptime_s", "ts")}
                    done.add(device_id)
            elif leaf is Leaf.EVENTS:
                ev = Event.parse(payload)
                if ev.job_id in (job_id, None):
                    r.events.append({"kind": ev.kind, "message": ev.message, "ts": ev.ts})
                # a job the device never accepted (untrusted signature, stale version, another target) is
                # refused with an event only: the device's persisted state and retained status stay its own
                if ev.kind == "refused" and ev.job_id == job_id and r.status is DeviceStatus.TIMEOUT:
                    r.status = DeviceStatus.FAILED
                    r.reason, r.result_code, r.active_version = ev.message, ev.result_code, ev.active_version
                    done.add(device_id)
        except ProtocolError as exc:
            log.warning("%s: %s", name, exc)

    leaves = (Leaf.STATUS, Leaf.METRICS, Leaf.STREAM_GET, Leaf.EVENTS) + ((Leaf.ONLINE,) if wide else ())
    subs = [(f"{prefix}/v1/+/{leaf.value}", 1) for leaf in leaves]
    watch = Watch(broker, prefix, subs, on_message, name="host").start()
    server = ChunkServer(watch.link, prefix, artifact, job_id, results, requests).start()
    deadline = time.monotonic() + timeout_s
    name = artifact_topic(prefix, job_id) if wide else None
    try:
        publish_job(watch.link, prefix, devices, job_id, artifact, name)
        if name is not None:  # a device says downloading once it has subscribed; one that says anything has answered
            wait, waiting = min(subscribe_wait_s, timeout_s), time.monotonic()
            watch.settle(wait)  # every retained online flag is in: devices offline now join late, through repairs
            watch.until(lambda: all(d in done or d in offline or results[d].states for d in devices), wait)
            delivery.broadcast.subscribed = sum(1 for d in devices if results[d].states and d not in done)
            delivery.broadcast.waited_s = round(time.monotonic() - waiting, 3)
            broadcast_chunks(watch.link, name, artifact, job_id, delivery.broadcast)
            log.info("broadcast %s: %d chunks, %d bytes in %.2f s to %d subscribed device(s)", job_id,
                     delivery.broadcast.chunks, delivery.broadcast.bytes_sent, delivery.broadcast.seconds,
                     delivery.broadcast.subscribed)
        watch.until(lambda: done >= set(devices), max(0.0, deadline - time.monotonic()))
    finally:
        server.stop()
        if name is not None:
            clear_retained(watch.link, name)
        watch.stop()
    for r in results.values():
        if r.device_id not in done and r.status is DeviceStatus.TIMEOUT:
            r.reason = r.reason or f"no verdict within {timeout_s:g} s (last state: {r.states[-1] if r.states else 'none'})"
    delivery.extend(results[d] for d in devices)
    return delivery
