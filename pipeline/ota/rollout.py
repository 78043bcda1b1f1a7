"""Staged rollout: canaries first, their health judged, then the rest, or an abort that rolls the
canaries back (hawkBit's groups with thresholds; AWS Jobs' abort criteria)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, encode, topic

from ..bundle import Artifact
from .delivery import DeviceResult, deliver


@dataclass(frozen=True)
class RolloutPolicy:
    canary_fraction: float = 0.2
    canary_min: int = 1
    max_failure_fraction: float = 0.0  # canaries allowed to fail before the rollout aborts
    latency_p95_ms: float | None = None  # a canary over this (measured on the device) aborts the rollout


@dataclass
class RolloutResult:
    results: list[DeviceResult]
    canaries: list[str]
    aborted: bool = False
    reason: str | None = None
    phases: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"canaries": self.canaries, "aborted": self.aborted, "reason": self.reason}


def judge(canary_results: list[DeviceResult], policy: RolloutPolicy) -> str | None:
    """Why the canaries say stop, or None."""
    failed = [r for r in canary_results if r.status != "activated"]
    if len(failed) > policy.max_failure_fraction * len(canary_results):
        return (f"{len(failed)}/{len(canary_results)} canaries did not activate "
                f"({', '.join(f'{r.device_id}: {r.status}' for r in failed)}); threshold "
                f"{policy.max_failure_fraction:.0%}")
    if policy.latency_p95_ms is not None:
        slow = [r for r in canary_results
                if r.metrics and r.metrics.get("latency_ms_p95", 0) > policy.latency_p95_ms]
        if slow:
            listed = ", ".join(f"{r.device_id} ({r.metrics['latency_ms_p95']:.3f} ms)" for r in slow)
            return f"latency p95 over the {policy.latency_p95_ms:g} ms budget on {listed}"
    return None


def send_command(broker: BrokerConfig, prefix: str, devices: list[str], command: str) -> None:
    link = MqttLink(broker, f"host-cmd-{uuid.uuid4().hex[:8]}", lambda t, p: None).start()
    try:
        for d in devices:
            link.publish(topic(prefix, d, Leaf.CMD), encode({"command": command}), qos=1).wait_for_publish(5)
    finally:
        link.stop()


def rollout(broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
            policy: RolloutPolicy, progress: Callable[[str, DeviceResult], None] | None = None,
            note: Callable[[str], None] = lambda m: None) -> RolloutResult:
    k = min(len(devices), max(policy.canary_min, math.ceil(policy.canary_fraction * len(devices))))
    canaries, rest = devices[:k], devices[k:]
    note(f"canaries: {', '.join(canaries)}" + (f"; then {len(rest)} more" if rest else ""))
    first = deliver(broker, prefix, artifact, canaries, timeout_s, progress)
    result = RolloutResult(first, canaries, phases={d: "canary" for d in canaries})
    reason = judge(first, policy)
    if reason is not None:
        activated = [r.device_id for r in first if r.status == "activated"]
        if activated:
            send_command(broker, prefix, activated, "rollback")
            for r in first:
                if r.device_id in activated:
                    r.status, r.reason = "rolled_back", f"rollout aborted: {reason}"
        result.aborted, result.reason = True, reason
        note(f"rollout aborted: {reason}")
        return result
    if rest:
        result.results += deliver(broker, prefix, artifact, rest, timeout_s, progress)
        result.phases.update({d: "rollout" for d in rest})
    return result
