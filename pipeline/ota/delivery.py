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
from collections import deque
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
    SUBSCRIBE_MAX_S, SUBSCRIBE_WAIT_S, BroadcastMode, BroadcastResult, broadcast_chunks, clear_retained,
    republish_chunk, use_broadcast,
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
    #: chunks the host sent this device: on its own stream/data, or (chunks_rebroadcast of them) once on the artifact
    #: topic for it and others asking at once; bytes_sent counts its own only (the rest is the broadcast's)
    chunks_served: int = 0
    chunks_resent: int = 0
    bytes_sent: int = 0
    chunks_rebroadcast: int = 0
    #: asked for and not served: left to the broadcast (on its way), or sent to it and not yet acknowledged by the broker
    chunks_deferred: int = 0
    chunks_in_flight: int = 0
    states: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: the state in the last status the device published (after a rollback command: where it stands then)
    device_state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "status": self.status.value, "active_version": self.active_version,
                "reason": self.reason, "result_code": self.result_code, "metrics": self.metrics,
                "chunks_served": self.chunks_served, "chunks_resent": self.chunks_resent,
                "bytes_sent": self.bytes_sent, "chunks_rebroadcast": self.chunks_rebroadcast,
                "chunks_deferred": self.chunks_deferred, "chunks_in_flight": self.chunks_in_flight,
                "states": self.states, "events": self.events,
                "device_state": self.device_state}


class Delivery(list):
    """A delivery's :class:`DeviceResult` list, with what the wave cost the host: ``broadcast`` (None when unicast)
    and ``egress_bytes``, the chunk frames the host published, broadcast, rebroadcast repairs and per device
    together."""

    broadcast: BroadcastResult | None = None

    @property
    def egress_bytes(self) -> int:
        b = self.broadcast
        return (b.bytes_sent + b.repair_bytes if b else 0) + sum(r.bytes_sent for r in self)

    def summary(self) -> dict[str, Any]:
        b = self.broadcast
        return {"mode": "broadcast" if b else "unicast", "egress_bytes": self.egress_bytes,
                "broadcast_bytes": b.bytes_sent if b else 0, "broadcast_chunks": b.chunks if b else 0,
                "repair_bytes": sum(r.bytes_sent for r in self) + (b.repair_bytes if b else 0),
                "rebroadcast_chunks": b.repair_chunks if b else 0,
                "deferred_chunks": b.chunks_deferred if b else 0,
                "in_flight_chunks": sum(r.chunks_in_flight for r in self), "subscribed": b.subscribed if b else None}


#: a chunk sent this recently is not sent again on a plain request: it may still be queued for the device
RESEND_AFTER_S = 3.0
#: nor is one the broker has not acknowledged yet (it is still in the host's outgoing queue), unless it has waited
#: this long (the link may have lost it)
LOST_AFTER_S = 30.0
#: per-device publishes the server may have unacknowledged by the broker: it waits past that, so its outgoing queue
#: (and what "not yet acknowledged" means) stays short, and requests queue up meanwhile, to be coalesced
SERVE_WINDOW = 64
#: while broadcasting, how long the server gathers requests after the first before it serves them together
COALESCE_S = 2.0
#: listening devices that must ask for a chunk at once for it to go once on the artifact topic instead, and the
#: share of the wave's devices still downloading they must be: every one of those receives a rebroadcast (and pays
#: for its bytes on a metered link), and the broker queues a copy for each (the likely cause of Mosquitto's 18 GB
#: and OOM kill at 1,000 starved agents, where repairs two devices asked for went to all of them)
REBROADCAST_MIN = 2
REBROADCAST_SHARE = 0.5
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
    ``chunks_resent``, ``bytes_sent`` and ``chunks_in_flight`` it counts up (and of a broadcast's devices,
    ``chunks_rebroadcast`` and ``chunks_deferred``).

    Of a broadcast (``broadcast``, published on ``artifact_name``): a listening device that has not seen the
    broadcast pass is left to it (what it lacks is on its way; see pipeline.ota.broadcast); what several devices
    that saw it pass ask for at once goes once on the artifact topic; a device that does not listen (an agent that
    knows no broadcast) is served alone at once. A chunk already sent to a device and not yet acknowledged by the
    broker is never sent to it again on a plain request: it is still queued on its way."""

    def __init__(self, link, prefix: str, artifact: Artifact, job_id: str, counters: dict[str, Any],
                 requests: queue.Queue[tuple[str, StreamGet]] | None = None,
                 broadcast: BroadcastResult | None = None, artifact_name: str | None = None) -> None:
        self.link, self.prefix, self.artifact, self.job_id, self.counters = link, prefix, artifact, job_id, counters
        self.requests: queue.Queue[tuple[str, StreamGet]] = requests if requests is not None else queue.Queue()
        self.broadcast, self.artifact_name = broadcast, artifact_name
        self._stop = threading.Event()
        #: device -> chunk -> (the publish's info, when it was handed to the link)
        self._sent: dict[str, dict[int, tuple[Any, float]]] = {d: {} for d in counters}
        self._unacked: deque = deque()
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
        while not self._stop.is_set():
            try:
                batch = [self.requests.get(timeout=0.2)]
            except queue.Empty:
                continue
            if self.broadcast is not None:  # what the others ask for meanwhile is served with it
                self._stop.wait(COALESCE_S)
            while len(batch) < 10_000:
                try:
                    batch.append(self.requests.get_nowait())
                except queue.Empty:
                    break
            self.serve(batch)

    def _wanted(self, batch: list[tuple[str, StreamGet]]) -> dict[int, dict[str, bool]]:
        """chunk -> {device: whether it listens on the artifact topic} of what the batch asks for and is to be sent."""
        b, chunks, now = self.broadcast, self.artifact.manifest.chunks, time.monotonic()
        wants: dict[int, dict[str, bool]] = {}
        for device_id, req in batch:
            r, sent = self.counters[device_id], self._sent[device_id]
            for index in dict.fromkeys(req.chunks):
                if index >= chunks:
                    self.link.publish(topic(self.prefix, device_id, Leaf.STREAM_REJECTED),
                                      encode({"job_id": self.job_id, "reason": f"chunk {index} out of range"}))
                    break
                if b is not None and req.listening and not (req.passed or req.resend) and b.leaves_to_broadcast(now):
                    r.chunks_deferred += 1  # the broadcast brings it
                    b.chunks_deferred += 1
                    continue
                if not req.resend and index in sent:
                    info, at = sent[index]
                    if (not info.is_published() and now - at < LOST_AFTER_S) or now - at < RESEND_AFTER_S:
                        r.chunks_in_flight += 1
                        continue
                wants.setdefault(index, {})[device_id] = req.listening and b is not None
        return wants

    def serve(self, batch: list[tuple[str, StreamGet]]) -> None:
        """Answer ``batch``, (device id, request) pairs taken together (the server's thread calls it)."""
        chunk_size, b = self.artifact.manifest.chunk_size, self.broadcast
        wanted = self._wanted(batch)
        if not wanted:
            return
        with open(self.artifact.model_path, "rb") as f:
            self._send(f, wanted, chunk_size, b)

    def _send(self, f, wanted: dict[int, dict[str, bool]], chunk_size: int, b: BroadcastResult | None) -> None:
        downloading = 0 if b is None else sum(1 for r in self.counters.values()
                                               if getattr(r, "device_state", None) == State.DOWNLOADING.value)
        for index, who in sorted(wanted.items()):
            f.seek(index * chunk_size)
            frame = encode_chunk(self.job_id, index, f.read(chunk_size))
            now = time.monotonic()
            alone = list(who)
            listening = [d for d, listens in who.items() if listens]
            if (b is not None and self.artifact_name is not None and len(listening) >= REBROADCAST_MIN
                    and len(listening) >= REBROADCAST_SHARE * max(downloading, len(listening))):
                info = republish_chunk(self.link, self.artifact_name, frame, b)
                self._pace(info)
                for d in listening:
                    self._count(d, index, info, now, frame, alone=False)
                alone = [d for d, listens in who.items() if not listens]
            for d in alone:
                info = self.link.publish(topic(self.prefix, d, Leaf.STREAM_DATA), frame, qos=1)
                self._pace(info)
                self._count(d, index, info, now, frame, alone=True)

    def _count(self, device_id: str, index: int, info, now: float, frame: bytes, alone: bool) -> None:
        r, sent = self.counters[device_id], self._sent[device_id]
        r.chunks_served += 1
        if alone:
            r.bytes_sent += len(frame)
        else:
            r.chunks_rebroadcast += 1
        if index in sent:
            r.chunks_resent += 1
        sent[index] = (info, now)

    def _pace(self, info) -> None:
        self._unacked.append(info)
        while len(self._unacked) > SERVE_WINDOW:
            oldest = self._unacked.popleft()
            try:
                oldest.wait_for_publish(10)
            except (RuntimeError, ValueError):  # not queued (the link dropped): the device asks again
                pass


def deliver(
    broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
    progress: Callable[[str, DeviceResult], None] | None = None, until: enum.Enum = DeviceStatus.ACTIVATED,
    broadcast: BroadcastMode | str | None = None, subscribe_wait_s: float = SUBSCRIBE_WAIT_S,
) -> Delivery:
    """``until``: the status whose value is the agent state that ends a device's delivery well: ``activated`` (then
    its metrics of the new version are waited for too), or for a shadow job ``shadowing`` (pipeline.ota.shadow);
    the agent's terminal states end it as well. ``broadcast``: a :class:`BroadcastMode` (None: the one in effect,
    ``auto`` unless :func:`pipeline.ota.broadcast.broadcasting` says otherwise); a broadcast waits for the online
    devices to subscribe (their ``downloading`` status) while they keep coming, until ``subscribe_wait_s`` pass with
    no new one (at most ``SUBSCRIBE_MAX_S`` in all), then publishes each chunk once, while the devices' own requests
    are served as repairs (:class:`ChunkServer`)."""
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
    name = artifact_topic(prefix, job_id) if wide else None
    server = ChunkServer(watch.link, prefix, artifact, job_id, results, requests, delivery.broadcast, name).start()
    deadline = time.monotonic() + timeout_s
    try:
        publish_job(watch.link, prefix, devices, job_id, artifact, name)
        if name is not None:  # a device says downloading once it has subscribed; one that says anything has answered
            waiting = time.monotonic()
            watch.settle(min(subscribe_wait_s, timeout_s))  # every retained online flag is in: devices offline now
            _wait_for_wave(watch, lambda: sum(1 for d in devices if d in done or d in offline or results[d].states),
                           len(devices), subscribe_wait_s, min(SUBSCRIBE_MAX_S, timeout_s))  # join late: repairs
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


def _wait_for_wave(watch: Watch, answered: Callable[[], int], devices: int, quiet_s: float, cap_s: float) -> None:
    """Wait until ``answered()`` reaches ``devices``, or ``quiet_s`` pass without it growing, or ``cap_s`` in all: a
    large wave on a slow host subscribes for longer than a fixed wait, and every device that subscribes before the
    first chunk takes the whole broadcast instead of repairs."""
    cap = time.monotonic() + cap_s
    seen = answered()
    while seen < devices:
        left = min(quiet_s, cap - time.monotonic())
        if left <= 0 or not watch.until(lambda: answered() != seen, left):
            return
        seen = answered()
