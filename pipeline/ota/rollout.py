"""Staged rollout: a shadow stage when the policy has one (pipeline.ota.shadow: the candidate judged on live traffic
beside the active model, never activated until promoted), canaries, their health judged, then the rest, or an abort
that asks the canaries to roll back (or the shadowing devices to drop the candidate) and records what each one
answered (hawkBit's groups with thresholds; AWS Jobs' abort criteria)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.config import BrokerConfig

from ..bundle import Artifact
from .commands import roll_back
from .delivery import DeviceResult, deliver
from .shadow import ShadowPolicy, ShadowResult, shadow_stage
from .status import DeviceStatus


@dataclass(frozen=True)
class RolloutPolicy:
    canary_fraction: float = 0.2
    canary_min: int = 1
    max_failure_fraction: float = 0.0  # canaries allowed to fail before the rollout aborts
    #: the target's p95 budget: a real canary over it (measured on the device) aborts the rollout; None: no
    #: latency judgement at all
    latency_p95_ms: float | None = None
    #: the latency predicted for this artifact on *this host* (the ``host`` target class): what an emulated
    #: agent, which runs here, is compared with (see ``too_slow``); None: emulated agents' latency is not judged
    host_latency_ms: float | None = None
    #: where ``host_latency_ms`` comes from: "measured" (this model timed on this host by the profile stage, with
    #: the threads local agents use) or "predicted" (the ``host`` class's prediction, when nothing was measured)
    host_basis: str = "predicted"
    #: a shadow stage before the canaries (its job: ``rollout(..., shadow=...)``); None: none
    shadow: ShadowPolicy | None = None


@dataclass
class RolloutResult:
    results: list[DeviceResult]
    canaries: list[str]
    aborted: bool = False
    reason: str | None = None
    phases: dict[str, str] = field(default_factory=dict)
    #: the latency limits the canaries were judged by
    limits: dict[str, float | None] = field(default_factory=dict)
    #: the shadow stage's decision, per device and overall; None without one
    shadow: ShadowResult | None = None
    #: seconds each stage took (shadow, canary, rollout)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"canaries": self.canaries, "aborted": self.aborted, "reason": self.reason, "limits": self.limits,
                "shadow": self.shadow.to_dict() if self.shadow is not None else None, "timings": self.timings}


def too_slow(r: DeviceResult, policy: RolloutPolicy, predicted_ms: float | None = None) -> str | None:
    """Why one canary's latency says stop, or None. ``predicted_ms``: the artifact's latency predicted for the
    target (its manifest's ``predicted``).

    The rule: only a device's own measurement meets its target class's p95 budget. An emulated agent
    (``emulated: true`` in its metrics: a local stand-in running on this host) measured *this host*, so its
    figure is never compared with the target's budget. What it can tell is how far the prediction for this host
    was off: the target's prediction, scaled by that same ratio (measured p50 / predicted for this host), must
    stay within the budget. p50, because that is the figure the predictor predicts, and because a busy host
    leaves it nearly unchanged while its p95 measures the neighbours (`make demo` on a loaded machine: p95
    12.1 ms against rpi4's 10 ms, for a model the rpi4 runs well within it). Without both predictions an
    emulated agent's latency is not judged.
    """
    return latency_over(r.device_id, r.metrics, policy, predicted_ms)


def latency_over(device_id: str, m: dict[str, Any] | None, policy: RolloutPolicy,
                 predicted_ms: float | None = None) -> str | None:
    """:func:`too_slow`'s rule on one device's figures (``latency_ms_p50``, ``latency_ms_p95``, ``emulated``): a
    canary's metrics, or a shadowed candidate's latency on the device (pipeline.ota.shadow)."""
    if not m or policy.latency_p95_ms is None:
        return None
    if m.get("emulated"):
        p50, host = m.get("latency_ms_p50"), policy.host_latency_ms
        if not (_positive(p50) and _positive(host) and _positive(predicted_ms)):
            return None
        estimate = predicted_ms * p50 / host
        if estimate > policy.latency_p95_ms:
            return (f"{device_id} (emulated: p50 {p50:.3f} ms on this host is {p50 / host:.1f}x the {host:.3f} ms "
                    f"{policy.host_basis} for it; the target's {predicted_ms:.3f} ms prediction scaled alike, "
                    f"{estimate:.3f} ms, is over the {policy.latency_p95_ms:g} ms budget)")
        return None
    p95 = m.get("latency_ms_p95")
    if _positive(p95) and p95 > policy.latency_p95_ms:
        return f"{device_id} ({p95:.3f} ms, over the {policy.latency_p95_ms:g} ms p95 budget)"
    return None


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def judge(canary_results: list[DeviceResult], policy: RolloutPolicy, predicted_ms: float | None = None) -> str | None:
    """Why the canaries say stop, or None."""
    failed = [r for r in canary_results if r.status is not DeviceStatus.ACTIVATED]
    if len(failed) > policy.max_failure_fraction * len(canary_results):
        return (f"{len(failed)}/{len(canary_results)} canaries did not activate "
                f"({', '.join(f'{r.device_id}: {r.status}' for r in failed)}); threshold "
                f"{policy.max_failure_fraction:.0%}")
    slow = [why for r in canary_results if (why := too_slow(r, policy, predicted_ms)) is not None]
    if slow:
        return f"canary latency too high: {'; '.join(slow)}"
    return None


def rollout(broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
            policy: RolloutPolicy, progress: Callable[[str, DeviceResult], None] | None = None,
            note: Callable[[str], None] = lambda m: None, shadow: Artifact | None = None,
            send: Callable[..., list[DeviceResult]] = deliver) -> RolloutResult:
    """The shadow stage (when ``policy.shadow``; ``shadow``: the candidate's shadow job, the same payload signed with
    the manifest's ``shadow`` leaf by :func:`pipeline.bundle.shadow_artifact`), canaries, their verdict, then the
    rest; ``send``: how a wave is delivered (``deliver``, or ``pipeline.ota.deltas.deliverer``: deltas against
    what each device runs). ``progress(state, result)`` runs as each device moves on, on paho's network thread (and, after an abort, on
    this one with each device's answer): it must return at once, so it queues rather than writes
    (``FleetStore.progress_queue``)."""
    k = min(len(devices), max(policy.canary_min, math.ceil(policy.canary_fraction * len(devices))))
    canaries, rest = devices[:k], devices[k:]
    predicted = (artifact.manifest.predicted or {}).get("latency_ms")
    result = RolloutResult([], canaries, limits={
        "latency_ms_p95": policy.latency_p95_ms, "target_predicted_latency_ms": predicted,
        "host_predicted_latency_ms": policy.host_latency_ms, "host_latency_basis": policy.host_basis})
    if policy.shadow is not None:
        _check_shadow_job(artifact, shadow)
        chosen = canaries if policy.shadow.devices == "canary" else devices
        started = time.monotonic()
        result.shadow = shadow_stage(
            broker, prefix, shadow, chosen, timeout_s, policy.shadow, max_failure_fraction=policy.max_failure_fraction,
            over_budget=lambda device, m: latency_over(device, m, policy, predicted), progress=progress, note=note)
        result.timings["shadow"] = round(time.monotonic() - started, 2)
        if not result.shadow.promoted:
            result.results = result.shadow.delivered
            result.phases = {r.device_id: "shadow" for r in result.results}
            result.aborted, result.reason = True, f"shadow stage: {result.shadow.reason}"
            note(f"rollout aborted: {result.reason}")
            return result
    note(f"canaries: {', '.join(canaries)}" + (f"; then {len(rest)} more" if rest else ""))
    started = time.monotonic()
    first = send(broker, prefix, artifact, canaries, timeout_s, progress)
    result.timings["canary"] = round(time.monotonic() - started, 2)
    result.results, result.phases = first, {d: "canary" for d in canaries}
    reason = judge(first, policy, predicted)
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
        started = time.monotonic()
        result.results += send(broker, prefix, artifact, rest, timeout_s, progress)
        result.timings["rollout"] = round(time.monotonic() - started, 2)
        result.phases.update({d: "rollout" for d in rest})
    return result


def _check_shadow_job(artifact: Artifact, shadow: Artifact | None) -> None:
    """The shadow job must be ``artifact``'s own payload and version, signed with a shadow leaf."""
    if shadow is None or shadow.manifest.shadow is None:
        raise ValueError("the rollout policy has a shadow stage but no shadow job was given: sign one with "
                         "pipeline.bundle.shadow_artifact(artifact, policy.shadow.leaf(), key_dir)")
    if (shadow.version, shadow.sha256) != (artifact.version, artifact.sha256):
        raise ValueError(f"the shadow job is v{shadow.version} ({shadow.sha256[:12]}), the rollout's artifact "
                         f"v{artifact.version} ({artifact.sha256[:12]}): they must be one payload")
