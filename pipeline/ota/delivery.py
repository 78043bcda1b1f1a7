"""Deliver one signed artifact to a set of devices and wait for each one's verdict.

The host publishes the job (retained), serves the chunks each device asks for, and collects
status and metrics. Terminal states map onto the report's delivery status:
activated | rolled_back | failed, or timeout when a device never answered.
"""

from __future__ import annotations

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
from device_agent.mqtt import MqttLink
from device_agent.protocol import (
    TERMINAL_STATES, Leaf, State, StreamGet, decode, encode, encode_chunk, parse_topic, topic,
)

from ..bundle import Artifact

log = logging.getLogger(__name__)


@dataclass
class DeviceResult:
    device_id: str
    status: str = "timeout"
    active_version: int | None = None
    reason: str | None = None
    result_code: int | None = None
    metrics: dict[str, Any] | None = None
    chunks_served: int = 0
    chunks_resent: int = 0
    bytes_sent: int = 0
    states: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "status": self.status, "active_version": self.active_version,
                "reason": self.reason, "result_code": self.result_code, "metrics": self.metrics,
                "chunks_served": self.chunks_served, "chunks_resent": self.chunks_resent,
                "bytes_sent": self.bytes_sent, "states": self.states, "events": self.events}


#: a chunk sent this recently is not sent again on a plain request: it may still be queued for the device
RESEND_AFTER_S = 3.0


def deliver(
    broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
    progress: Callable[[str, DeviceResult], None] | None = None,
) -> list[DeviceResult]:
    job_id = f"j{artifact.version}-{uuid.uuid4().hex[:8]}"
    results = {d: DeviceResult(d) for d in devices}
    done = {d: threading.Event() for d in devices}
    requests: queue.Queue[tuple[str, StreamGet]] = queue.Queue()
    chunk_size = artifact.manifest.chunk_size

    def on_message(name: str, payload: bytes) -> None:
        try:
            device_id, leaf = parse_topic(prefix, name)
        except ProtocolError:
            return
        r = results.get(device_id)
        if r is None or not payload:
            return
        try:
            if leaf is Leaf.STREAM_GET:
                req = StreamGet.parse(payload)
                if req.job_id == job_id:
                    requests.put((device_id, req))
            elif leaf is Leaf.STATUS:
                body = decode(payload, "status")
                if body.get("job_id") != job_id:
                    return
                state = body.get("state")
                if not r.states or r.states[-1] != state:
                    r.states.append(state)
                r.active_version, r.reason, r.result_code = (body.get("active_version"), body.get("reason"),
                                                             body.get("result_code"))
                if state in {s.value for s in TERMINAL_STATES}:
                    r.status = state
                    if state != State.ACTIVATED.value:  # no metrics follow a refusal or rollback
                        done[device_id].set()
                if progress is not None:
                    progress(state, r)
            elif leaf is Leaf.METRICS:
                body = decode(payload, "metrics")
                if r.status == State.ACTIVATED.value and body.get("version") == artifact.version:
                    r.metrics = {k: body.get(k) for k in (
                        "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "throughput_ips", "rss_mb", "runs",
                        "cpu_percent", "temperature_c", "energy_mj", "energy_source", "slot", "emulated", "errors",
                        "uptime_s", "ts")}
                    done[device_id].set()
            elif leaf is Leaf.EVENTS:
                body = decode(payload, "event")
                if body.get("job_id") in (job_id, None):
                    r.events.append({k: body.get(k) for k in ("kind", "message", "ts")})
        except ProtocolError as exc:
            log.warning("%s: %s", name, exc)

    subs = [(f"{prefix}/v1/+/{leaf.value}", 1) for leaf in (Leaf.STATUS, Leaf.METRICS, Leaf.STREAM_GET, Leaf.EVENTS)]
    link = MqttLink(broker, f"host-{uuid.uuid4().hex[:10]}", on_message, subs).start()
    stop = threading.Event()

    sent_at: dict[str, dict[int, float]] = {d: {} for d in devices}

    def serve() -> None:
        with open(artifact.model_path, "rb") as f:
            while not stop.is_set():
                try:
                    device_id, req = requests.get(timeout=0.2)
                except queue.Empty:
                    continue
                r, last = results[device_id], sent_at[device_id]
                for index in req.chunks:
                    if index >= artifact.manifest.chunks:
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

    server = threading.Thread(target=serve, name="chunk-server", daemon=True)
    server.start()
    try:
        for device_id in devices:
            link.publish(topic(prefix, device_id, Leaf.JOB),
                         encode({"job_id": job_id, "manifest": artifact.envelope}), qos=1, retain=True)
        deadline = time.monotonic() + timeout_s
        for device_id in devices:
            done[device_id].wait(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
        server.join(5)
        link.stop()
    for r in results.values():
        if not done[r.device_id].is_set() and r.status == "timeout":
            r.reason = r.reason or f"no verdict within {timeout_s:g} s (last state: {r.states[-1] if r.states else 'none'})"
    return [results[d] for d in devices]
