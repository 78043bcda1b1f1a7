"""Deliver a calibration suite (a signed ``calibration`` artifact) to devices and collect what they time.

The job travels as any job does: published retained on each device's ``job`` topic, its chunks served as the
device asks for them (``ChunkServer``, as for a model). The agent never installs it: it times the suite and
publishes ``calibration`` messages (``device_agent.protocol.Calibration``) in batches, ``done`` of ``total``, the
last with ``finished``. The host keys results by (device, case id): a message seen twice, or a case timed again
after the agent restarted mid-suite, replaces what it had. It stops when every device has finished or was
refused, or when the timeout passes; what a device sent before that counts (partial results), and the outcome
says which devices did not finish. A malformed calibration message is refused and counted, never fatal. At the
end the retained job is cleared: a device that comes online later does not start a suite nobody listens to.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.errors import ProtocolError
from device_agent.protocol import Calibration, Event, Leaf, State, Status, StreamGet, parse_topic, topic

from ..bundle import Artifact
from .delivery import ChunkServer, publish_job
from .watch import Watch

log = logging.getLogger(__name__)

#: what is kept of a device's ``env`` (its agent's and runtime's versions, CPU, machine, threads): bounded
MAX_ENV_KEYS = 32
MAX_ENV_TEXT = 200


class CalibrationStatus(enum.StrEnum):
    """One device's outcome in a calibration."""

    #: the job was published; the device has said nothing about it yet
    PENDING = "pending"
    #: the device is fetching or checking the suite (its status says so)
    DOWNLOADING = "downloading"
    #: results are coming in
    RUNNING = "running"
    #: the device timed the whole suite (``finished``, no error)
    FINISHED = "finished"
    #: the device finished with an error: it stopped early (its time budget) or left cases out (a case that failed
    #: to run); what it sent counts
    STOPPED = "stopped"
    #: the device refused the job (signature, version, class, kind...) and timed nothing
    REFUSED = "refused"
    #: the device accepted the job and then failed it (download, integrity)
    FAILED = "failed"
    #: the host stopped waiting before the device finished; what it sent counts
    TIMEOUT = "timeout"


#: the device said ``finished``
FINISHED = frozenset({CalibrationStatus.FINISHED, CalibrationStatus.STOPPED})
#: a device with one of these says no more about this job
SETTLED = frozenset({CalibrationStatus.FINISHED, CalibrationStatus.STOPPED, CalibrationStatus.REFUSED,
                     CalibrationStatus.FAILED})


@dataclass
class DeviceCalibration:
    device_id: str
    status: CalibrationStatus = CalibrationStatus.PENDING
    #: case id -> the device's figures for it (median_ms, p10_ms, p90_ms, runs, rounds)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: int = 0
    total: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    #: why it stopped early, was refused or failed, in the device's words
    reason: str | None = None
    states: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: calibration messages taken, and those refused (malformed, or naming cases the suite does not have)
    messages: int = 0
    refused_messages: int = 0
    chunks_served: int = 0
    chunks_resent: int = 0
    bytes_sent: int = 0
    chunks_in_flight: int = 0  # asked for again while still on its way: not sent twice (ChunkServer)
    started: float | None = None
    finished: float | None = None

    @property
    def wall_s(self) -> float | None:
        return round(self.finished - self.started, 2) if self.started and self.finished else None

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "status": self.status.value, "cases": len(self.results),
                "done": self.done, "total": self.total, "reason": self.reason, "env": self.env,
                "states": self.states, "events": self.events[-20:], "messages": self.messages,
                "refused_messages": self.refused_messages, "chunks_served": self.chunks_served,
                "bytes_sent": self.bytes_sent, "wall_s": self.wall_s}


@dataclass
class CalibrationRun:
    job_id: str
    devices: list[DeviceCalibration]
    timeout_s: float
    wall_s: float

    @property
    def unfinished(self) -> list[str]:
        """The devices that never said ``finished`` (refused, failed, or still going at the timeout)."""
        return [d.device_id for d in self.devices if d.status not in FINISHED]

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """device id -> case id -> figures, for every device that sent any."""
        return {d.device_id: d.results for d in self.devices if d.results}

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "timeout_s": self.timeout_s, "wall_s": self.wall_s,
                "unfinished": self.unfinished, "devices": [d.to_dict() for d in self.devices]}


def _env(env: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in list(env.items())[:MAX_ENV_KEYS]:
        if isinstance(v, (bool, int, float)) or v is None:
            out[str(k)[:64]] = v
        else:
            out[str(k)[:64]] = str(v)[:MAX_ENV_TEXT]
    return out


class Collector:
    """What the devices say about one calibration job; ``handle`` is total (what does not fit is counted, logged
    and dropped). ``progress(device)`` is called on the network thread after a device's state moved."""

    def __init__(self, prefix: str, job_id: str, version: int, devices: list[str], cases: set[str],
                 progress: Callable[[DeviceCalibration], None] | None = None) -> None:
        self.prefix, self.job_id, self.version, self.cases = prefix, job_id, version, cases
        self.devices = {d: DeviceCalibration(d) for d in devices}
        self.progress = progress
        self.server: ChunkServer | None = None

    def settled(self) -> bool:
        return all(d.status in SETTLED for d in self.devices.values())

    def handle(self, name: str, payload: bytes) -> None:
        try:
            device_id, leaf = parse_topic(self.prefix, name)
        except ProtocolError:
            return
        d = self.devices.get(device_id)
        if d is None or not payload:
            return
        try:
            moved = self._handle(d, leaf, payload)
        except ProtocolError as exc:
            if leaf is Leaf.CALIBRATION:
                d.refused_messages += 1
            log.warning("%s: %s", name[:200], exc)
            return
        except Exception as exc:  # noqa: BLE001 - one message never stops the collection
            d.refused_messages += leaf is Leaf.CALIBRATION
            log.warning("%s: %s: %s", name[:200], type(exc).__name__, exc)
            return
        if moved and self.progress is not None:
            self.progress(d)

    def _handle(self, d: DeviceCalibration, leaf: Leaf, payload: bytes) -> bool:
        if leaf is Leaf.STREAM_GET:
            if self.server is not None:
                self.server.request(d.device_id, StreamGet.parse(payload))
            return False
        if leaf is Leaf.CALIBRATION:
            return self._calibration(d, Calibration.parse(payload))
        if leaf is Leaf.STATUS:
            st = Status.parse(payload)
            if st.job_id != self.job_id:
                return False
            if not d.states or d.states[-1] != st.state:
                d.states.append(st.state)
            d.started = d.started or time.time()
            if st.state == State.FAILED.value and d.status not in SETTLED:
                d.status, d.reason = CalibrationStatus.FAILED, st.reason or "the device failed the job"
                d.finished = time.time()
            elif d.status is CalibrationStatus.PENDING:
                d.status = CalibrationStatus.DOWNLOADING
            return True
        if leaf is Leaf.EVENTS:
            ev = Event.parse(payload)
            if ev.job_id != self.job_id:
                return False
            d.events.append({"kind": ev.kind, "message": ev.message, "ts": ev.ts})
            if ev.kind == "refused" and d.status not in SETTLED and not d.results:
                d.status, d.reason = CalibrationStatus.REFUSED, ev.message
                d.finished = time.time()
            return True
        return False

    def _calibration(self, d: DeviceCalibration, msg: Calibration) -> bool:
        if msg.job_id != self.job_id:
            return False
        if msg.device_id != d.device_id or msg.version != self.version:
            raise ProtocolError(f"calibration: device {msg.device_id!r} v{msg.version} on {d.device_id}'s topic "
                                f"for v{self.version}")
        unknown = [r["id"] for r in msg.results if r["id"] not in self.cases]
        if unknown:
            raise ProtocolError(f"calibration: {len(unknown)} case id(s) the suite does not have "
                                f"({', '.join(map(repr, unknown[:3]))})")
        d.messages += 1
        d.started = d.started or time.time()
        for r in msg.results:
            d.results[r["id"]] = dict(r)  # a case timed again (after a restart) replaces the earlier figure
        d.done, d.total = max(d.done, msg.done), msg.total
        if msg.env:
            d.env = _env(msg.env)
        if d.status in (CalibrationStatus.PENDING, CalibrationStatus.DOWNLOADING):
            d.status = CalibrationStatus.RUNNING
        if msg.finished and d.status not in SETTLED:
            d.status = CalibrationStatus.STOPPED if msg.error else CalibrationStatus.FINISHED
            d.reason = msg.error
            d.finished = time.time()
        return True


def run_calibration_job(broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str],
                        cases: set[str], timeout_s: float,
                        progress: Callable[[DeviceCalibration], None] | None = None) -> CalibrationRun:
    """Publish ``artifact`` (a calibration suite of ``cases``) to ``devices`` and collect their timings until each
    has settled or ``timeout_s`` has passed."""
    job_id = f"c{artifact.version}-{uuid.uuid4().hex[:8]}"
    collector = Collector(prefix, job_id, artifact.version, devices, cases, progress)
    leaves = (Leaf.STATUS, Leaf.EVENTS, Leaf.STREAM_GET, Leaf.CALIBRATION)
    subs = [(f"{prefix}/v1/+/{leaf.value}", 1) for leaf in leaves]
    started = time.monotonic()
    watch = Watch(broker, prefix, subs, collector.handle, name="host-calibrate").start()
    try:
        collector.server = ChunkServer(watch.link, prefix, artifact, job_id, collector.devices).start()
        try:
            publish_job(watch.link, prefix, devices, job_id, artifact)
            watch.until(collector.settled, timeout_s)
        finally:
            collector.server.stop()
            for device_id in devices:  # the job is over: no device starts it later with nobody listening
                watch.publish(topic(prefix, device_id, Leaf.JOB), b"", qos=1, retain=True)
    finally:
        watch.stop()
    for d in collector.devices.values():  # the network thread has stopped: nothing changes them now
        if d.status not in SETTLED:
            d.reason = d.reason or (f"not finished within {timeout_s:g} s ({len(d.results)} of "
                                    f"{d.total or len(cases)} cases; last state: "
                                    f"{d.states[-1] if d.states else 'none'})")
            d.status = CalibrationStatus.TIMEOUT
    return CalibrationRun(job_id, [collector.devices[d] for d in devices], timeout_s,
                          round(time.monotonic() - started, 2))
