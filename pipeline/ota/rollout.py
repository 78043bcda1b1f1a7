"""Staged rollout: canaries first, their health judged, then the rest, or an abort that asks the canaries to
roll back and records what each one answered (hawkBit's groups with thresholds; AWS Jobs' abort criteria)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.config import BrokerConfig

from ..bundle import Artifact
from .commands import roll_back
from .delivery import DeviceResult, deliver
from .status import DeviceStatus

#: an emulated agent's p50 may be this many times the latency predicted for this host before the rollout stops
#: (the predictor's median error is ~7% on a quiet host; a busy one runs a model 2-3x slower)
EMULATED_LATENCY_FACTOR = 4.0


@dataclass(frozen=True)
class RolloutPolicy:
    canary_fraction: float = 0.2
    canary_min: int = 1
    max_failure_fraction: float = 0.0  # canaries allowed to fail before the rollout aborts
    #: the target's p95 budget: a real canary over it (measured on the device) aborts the rollout; None: no
    #: latency judgement at all
    latency_p95_ms: float | None = None
    #: the latency predicted for this artifact on *this host* (the ``host`` target class): what an emulated
    #: agent, which runs here, is judged against; None: emulated agents' latency is not judged
    host_latency_ms: float | None = None
    emulated_latency_factor: float = EMULATED_LATENCY_FACTOR


@dataclass
class RolloutResult:
    results: list[DeviceResult]
    canaries: list[str]
    aborted: bool = False
    reason: str | None = None
    phases: dict[str, str] = field(default_factory=dict)
    #: the latency limits the canaries were judged by
    limits: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"canaries": self.canaries, "aborted": self.aborted, "reason": self.reason, "limits": self.limits}


def too_slow(r: DeviceResult, policy: RolloutPolicy) -> str | None:
    """Why one canary's latency says stop, or None.

    The rule: a device is judged against the budget of its target class only by what it measured itself. An
    emulated agent (``emulated: true`` in its metrics: a local stand-in running on this host) measured *this
    host*, not the target, so its figures never meet the target's budget. It is judged against the latency
    predicted for this host instead, on p50 (the figure the predictor predicts; a shared host's p95 measures
    its neighbours): more than ``emulated_latency_factor`` times the prediction means the model is slower than
    its profile said, which the target would suffer too.
    """
    m = r.metrics
    if not m or policy.latency_p95_ms is None:
        return None
    if m.get("emulated"):
        p50, expected = m.get("latency_ms_p50"), policy.host_latency_ms
        if expected is None or expected <= 0 or not isinstance(p50, (int, float)):
            return None
        if p50 > policy.emulated_latency_factor * expected:
            return (f"{r.device_id} (emulated: p50 {p50:.3f} ms on this host, {p50 / expected:.1f}x the "
                    f"{expected:.3f} ms predicted for it; limit {policy.emulated_latency_factor:g}x)")
        return None
    p95 = m.get("latency_ms_p95")
    if isinstance(p95, (int, float)) and p95 > policy.latency_p95_ms:
        return f"{r.device_id} ({p95:.3f} ms, over the {policy.latency_p95_ms:g} ms p95 budget)"
    return None


def judge(canary_results: list[DeviceResult], policy: RolloutPolicy) -> str | None:
    """Why the canaries say stop, or None."""
    failed = [r for r in canary_results if r.status is not DeviceStatus.ACTIVATED]
    if len(failed) > policy.max_failure_fraction * len(canary_results):
        return (f"{len(failed)}/{len(canary_results)} canaries did not activate "
                f"({', '.join(f'{r.device_id}: {r.status}' for r in failed)}); threshold "
                f"{policy.max_failure_fraction:.0%}")
    slow = [why for r in canary_results if (why := too_slow(r, policy)) is not None]
    if slow:
        return f"canary latency too high: {'; '.join(slow)}"
    return None


def rollout(broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
            policy: RolloutPolicy, progress: Callable[[str, DeviceResult], None] | None = None,
            note: Callable[[str], None] = lambda m: None) -> RolloutResult:
    k = min(len(devices), max(policy.canary_min, math.ceil(policy.canary_fraction * len(devices))))
    canaries, rest = devices[:k], devices[k:]
    note(f"canaries: {', '.join(canaries)}" + (f"; then {len(rest)} more" if rest else ""))
    first = deliver(broker, prefix, artifact, canaries, timeout_s, progress)
    result = RolloutResult(first, canaries, phases={d: "canary" for d in canaries}, limits={
        "latency_ms_p95": policy.latency_p95_ms, "host_predicted_latency_ms": policy.host_latency_ms,
        "emulated_latency_factor": policy.emulated_latency_factor if policy.host_latency_ms is not None else None})
    reason = judge(first, policy)
    if reason is not None:
        note(f"rollout aborted: {reason}")
        activated = [r for r in first if r.status is DeviceStatus.ACTIVATED]
        if activated:
            note(f"asking {', '.join(r.device_id for r in activated)} to roll back")
            answers = {a.device_id: a for a in roll_back(broker, prefix, [r.device_id for r in activated],
                                                           timeout_s)}
            for r in activated:
                a = answers[r.device_id]
                r.status, r.reason = a.status, f"rollout aborted: {reason}; {a.message or a.status}"
                if a.active_version is not None:
                    r.active_version = a.active_version
                r.device_state = a.state or r.device_state
                if a.event is not None:
                    r.events.append(a.event)
                note(f"{r.device_id}: {a.status} (active v{r.active_version})")
                if progress is not None:
                    progress(a.status, r)
        result.aborted, result.reason = True, reason
        return result
    if rest:
        result.results += deliver(broker, prefix, artifact, rest, timeout_s, progress)
        result.phases.update({d: "rollout" for d in rest})
    return result
