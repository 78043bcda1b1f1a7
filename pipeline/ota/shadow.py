"""Stage 0 of a rollout: the candidate shadowed on live traffic beside the active model, then promoted or dropped.

A device given the candidate's *shadow job* (its manifest with the signed ``shadow`` leaf,
:func:`pipeline.bundle.shadow_artifact`) installs and health-checks it but keeps serving its active model; the agent
runs the candidate off the request path on ``sample`` of the live requests and counts how often the two agree
(``device_agent.quality.ShadowStats``, in every metrics message it sends). The host:

1. delivers the shadow job to the chosen devices (the rollout's canaries, or all of them); a device that does not
   reach ``shadowing`` is a failure as a canary that does not activate is (``max_failure_fraction``);
2. asks each shadowing device for its counters every ``report_every_s`` (the agent sends metrics when asked) until
   it has compared ``min_samples`` requests, and judges it then (:func:`judge_device`). A device judged bad, one that
   goes offline or stops shadowing, or the ``timeout_s`` passing with a device short of samples ends the stage;
3. promotes when every shadowing device passed (the rollout goes on: canaries, then the rest, each given the normal
   job, which activates the candidate a shadowing device already holds), else sends ``drop_shadow`` to every
   shadowing device, waits for each one's ``shadow_dropped`` and clears their retained job: no device ever
   activated the candidate.

What was decided, per device and overall, is :meth:`ShadowResult.to_dict`: the rollout's record in the fleet store.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.errors import ProtocolError
from device_agent.protocol import Event, Leaf, Metrics, State, Status, encode, parse_topic, topic
from device_agent.quality import BUCKETS_MS, HISTOGRAM, Shadow, ShadowStats

from ..bundle import Artifact
from .commands import command, command_id
from .delivery import DeviceResult, deliver
from .status import DeviceStatus
from .watch import Watch

log = logging.getLogger(__name__)

#: how long a shadowing device is given to answer drop_shadow, at most (the rollout's timeout when shorter)
DROP_TIMEOUT_S = 60.0


#: the event that answers ``drop_shadow`` -> the status it confirms (pipeline.ota.commands.command)
DROP_ANSWERS = {"shadow_dropped": DeviceStatus.SHADOW_DROPPED}


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    #: not judged: short of samples at the timeout, offline, or the stage ended on another device first
    UNDECIDED = "undecided"
    #: not judged, and not in the way: the device runs no model, so it has nothing to compare the candidate with
    SKIPPED = "skipped"


@dataclass(frozen=True)
class ShadowPolicy:
    """deploy.yaml ``fleet.rollout.shadow`` (pipeline.config.ShadowConfig) as the rollout reads it."""

    sample: float = 0.1
    max_cpu: float = 0.25
    min_agreement: float = 0.9
    max_distance: float | None = None
    min_samples: int = 200
    max_latency_ratio: float | None = 1.5
    timeout_s: float = 600.0
    devices: str = "canary"  # "canary": the rollout's canaries shadow; "all": every device
    report_every_s: float = 5.0

    def leaf(self) -> Shadow:
        """What the shadow job's manifest carries."""
        return Shadow(self.sample, self.max_cpu)


# --------------------------------------------------------------------------- the judgement, pure

def histogram_quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram over ``BUCKETS_MS`` (the last count is the overflow bucket), interpolated
    linearly within its bucket as Prometheus' ``histogram_quantile`` does; the overflow bucket reads its lower bound.
    None when empty. (``device_agent.serving.quantile_ms`` reads the bucket's upper bound: with bounds 2-2.5x apart,
    a ratio of two of those is 1 or at least 2, too coarse to hold to ``max_latency_ratio``.)"""
    total = sum(buckets)
    if total == 0:
        return None
    rank, below = q * total, 0
    for i, count in enumerate(buckets):
        if count and below + count >= rank:
            if i >= len(BUCKETS_MS):
                return float(BUCKETS_MS[-1])
            lower = BUCKETS_MS[i - 1] if i else 0.0
            return lower + (BUCKETS_MS[i] - lower) * max(0.0, rank - below) / count
        below += count
    return float(BUCKETS_MS[-1])


@dataclass
class DeviceShadow:
    """One shadowing device: its counters (every agent start's added up) and what was decided of it."""

    device_id: str
    verdict: Verdict = Verdict.UNDECIDED
    reason: str | None = None
    stats: ShadowStats | None = None
    emulated: bool | None = None
    online: bool = True
    #: the device no longer shadows (it said so: another state, or a shadow_dropped of its own)
    left: bool = False
    #: per agent start (the metrics' ``boot``), its latest report's seq and counters: an agent counts from zero
    #: after a restart, and what it had compared before still counts
    boots: dict[int | None, tuple[int | None, ShadowStats]] = field(default_factory=dict, repr=False)

    def take(self, boot: int | None, seq: int | None, stats: ShadowStats) -> bool:
        """A report's counters; False for one older than this start's latest (a redelivery). ``stats`` then is
        every start's counters added up, in the order of the starts."""
        seen = self.boots.get(boot)
        if seen is not None and seq is not None and seen[0] is not None and seq <= seen[0]:
            return False
        self.boots[boot] = (seq, stats)
        ordered = [s for _, (_, s) in sorted(self.boots.items(), key=lambda kv: -1 if kv[0] is None else kv[0])]
        total = ordered[0]
        for later in ordered[1:]:
            total = total.plus(later)
        self.stats = total
        return True

    def figures(self) -> dict[str, Any]:
        s = self.stats
        if s is None:
            return {"samples": 0}
        tried = s.compared + s.errors
        active_p95, candidate_p95 = histogram_quantile(s.active_ms, 0.95), histogram_quantile(s.candidate_ms, 0.95)
        b = s.bench or {}
        # how fast the candidate would serve: both models timed alike at install (the serving threads, normal
        # priority); the shadow's own histograms time it on its low-priority thread beside the traffic
        like = (b.get("candidate_p50_ms"), b.get("candidate_p95_ms"), b.get("active_p95_ms"))
        if all(like):
            served_p50, served_p95, against = like
        else:
            served_p50, served_p95, against = histogram_quantile(s.candidate_ms, 0.5), candidate_p95, active_p95
        return {
            "samples": s.compared, "offered": s.offered, "dropped": s.dropped, "errors": s.errors,
            "agreement": _round(s.agree / tried) if s.top1 and tried else None, "top1": s.top1,
            "mean_distance": _round(s.sum_distance / s.compared) if s.compared else None,
            "max_distance": _round(s.max_distance), "active_version": s.active, "emulated": self.emulated,
            "active_ms_p50": _round(histogram_quantile(s.active_ms, 0.5)), "active_ms_p95": _round(active_p95),
            "shadow_ms_p50": _round(histogram_quantile(s.candidate_ms, 0.5)), "shadow_ms_p95": _round(candidate_p95),
            "candidate_ms_p50": _round(served_p50), "candidate_ms_p95": _round(served_p95),
            "latency_basis": "benchmark" if all(like) else "shadow", "active_ms_p95_against": _round(against),
            "latency_ratio": _round(served_p95 / against) if served_p95 and against else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "verdict": self.verdict.value, "reason": self.reason, **self.figures()}


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


#: (device id, the candidate's figures as metrics: latency_ms_p50/p95, emulated) -> why it is over the target's
#: budget, or None (pipeline.ota.rollout.latency_over, bound to the rollout's limits)
OverBudget = Callable[[str, dict[str, Any]], str | None]


def judge_device(record: DeviceShadow, policy: ShadowPolicy, over_budget: OverBudget | None = None
                 ) -> tuple[Verdict, str | None]:
    """One device's verdict on its counters: undecided below ``min_samples`` compared requests; else a pass when the
    candidate answers as the active model does on at least ``min_agreement`` of them (top-1; a shadow run that failed
    does not agree), its mean output distance is within ``max_distance`` (when set; the only judge of outputs that
    are not class scores), its p95 within ``max_latency_ratio`` of the active model's and within the target's budget
    (``over_budget``); a fail naming every limit missed."""
    s, d = record.stats, record.device_id
    if s is None or s.compared < policy.min_samples:
        return Verdict.UNDECIDED, f"{s.compared if s else 0} of {policy.min_samples} requests compared"
    f = record.figures()
    tried = s.compared + s.errors
    problems = []
    if s.top1:
        if f["agreement"] is not None and s.agree / tried < policy.min_agreement:
            failed = f", {s.errors} shadow runs failed" if s.errors else ""
            problems.append(f"top-1 agreement {s.agree / tried:.1%} ({s.agree} of {tried}{failed}), under the "
                            f"{policy.min_agreement:.0%} required")
    else:
        if policy.max_distance is None:
            problems.append("its outputs are not class scores (no top-1 to agree on) and rollout.shadow.max_distance "
                            "is not set: nothing to judge them by")
        if s.errors > (1 - policy.min_agreement) * tried:
            problems.append(f"{s.errors} of {tried} shadow runs failed")
    if policy.max_distance is not None and f["mean_distance"] is not None \
            and s.sum_distance / s.compared > policy.max_distance:
        problems.append(f"mean output distance {f['mean_distance']:g} over the {policy.max_distance:g} allowed "
                        f"(max {f['max_distance']:g})")
    ratio = f["latency_ratio"]
    if policy.max_latency_ratio is not None and ratio is not None and ratio > policy.max_latency_ratio:
        problems.append(f"p95 {f['candidate_ms_p95']:g} ms is {ratio:.2f}x the active model's "
                        f"{f['active_ms_p95_against']:g} ms ({f['latency_basis']}), over the "
                        f"{policy.max_latency_ratio:g}x allowed")
    if over_budget is not None and f["candidate_ms_p95"] is not None:
        why = over_budget(d, {"latency_ms_p50": f["candidate_ms_p50"], "latency_ms_p95": f["candidate_ms_p95"],
                              "emulated": bool(record.emulated)})
        if why is not None:
            problems.append(f"the target's latency budget: {why}")
    return (Verdict.FAIL, "; ".join(problems)) if problems else (Verdict.PASS, None)


def decide(records: list[DeviceShadow]) -> str | None:
    """Why the stage aborts, or None: every device must have passed (or been skipped: it runs no model)."""
    failed = [r for r in records if r.verdict is Verdict.FAIL]
    if failed:
        return "the candidate fails: " + "; ".join(f"{r.device_id}: {r.reason}" for r in failed)
    undecided = [r for r in records if r.verdict is Verdict.UNDECIDED]
    if undecided:
        return "not enough evidence: " + "; ".join(f"{r.device_id}: {r.reason}" for r in undecided)
    return None


# --------------------------------------------------------------------------- the stage

@dataclass
class ShadowResult:
    candidate: int
    policy: ShadowPolicy
    devices: list[DeviceShadow] = field(default_factory=list)
    #: the shadow job's delivery, per chosen device; after an abort, each one's answer to drop_shadow
    delivered: list[DeviceResult] = field(default_factory=list)
    promoted: bool = False
    reason: str | None = None
    wall_s: float = 0.0
    #: seconds of each step: the shadow job's delivery, the samples' collection, the drop after an abort
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "decision": "promoted" if self.promoted else "aborted",
                "reason": self.reason, "devices": [d.to_dict() for d in self.devices],
                "delivery": {r.device_id: r.status.value for r in self.delivered},
                "policy": asdict(self.policy), "wall_s": self.wall_s, "timings": self.timings}


class _Collector:
    """What the shadowing devices say, on the watch's network thread (under its lock)."""

    def __init__(self, prefix: str, version: int, devices: list[str], policy: ShadowPolicy,
                 over_budget: OverBudget | None, note: Callable[[str], None]) -> None:
        self.prefix, self.version, self.policy, self.over_budget, self.note = prefix, version, policy, over_budget, note
        self.records = {d: DeviceShadow(d) for d in devices}
        self._told: dict[str, int] = {d: 0 for d in devices}  # the quarter of min_samples last shown

    def waiting(self) -> list[str]:
        return [d for d, r in self.records.items() if r.verdict is Verdict.UNDECIDED and r.online and not r.left]

    def settled(self) -> bool:
        """Every device judged, or one that ends the stage: failed, offline, no longer shadowing."""
        return not self.waiting() or any(r.verdict is Verdict.FAIL or not r.online or r.left
                                         for r in self.records.values())

    def handle(self, name: str, payload: bytes) -> None:
        try:
            device, leaf = parse_topic(self.prefix, name)
            r = self.records.get(device)
            if r is None or not payload or r.verdict is not Verdict.UNDECIDED:
                return
            if leaf is Leaf.METRICS:
                self._metrics(r, Metrics.parse(payload))
            elif leaf is Leaf.ONLINE and payload == b"offline":
                r.online = False
                r.reason = f"went offline with {_counts(r, self.policy)}"
            elif leaf is Leaf.STATUS:
                st = Status.parse(payload)
                if st.state != State.SHADOWING.value:
                    r.left = True
                    r.reason = (f"stopped shadowing ({st.state}{': ' + st.reason if st.reason else ''}) with "
                                f"{_counts(r, self.policy)}")
            elif leaf is Leaf.EVENTS:
                ev = Event.parse(payload)
                if ev.kind == "shadow_dropped":  # nobody asked yet: the device gave the candidate up itself
                    r.left = True
                    r.reason = f"dropped the candidate itself ({ev.message[:200]}) with {_counts(r, self.policy)}"
        except ProtocolError as exc:
            log.warning("%s: %s", name[:200], exc)

    def _metrics(self, r: DeviceShadow, m: Metrics) -> None:
        if m.shadow is None:
            return
        stats = ShadowStats.from_dict(m.shadow, HISTOGRAM)
        if stats.candidate != self.version or not r.take(m.boot, m.seq, stats):
            return
        r.emulated, stats = m.emulated, r.stats
        quarter = min(4, 4 * stats.compared // self.policy.min_samples)
        if quarter > self._told[r.device_id]:
            self._told[r.device_id] = quarter
            f = r.figures()
            agreement = f"agreement {f['agreement']:.1%}" if f["agreement"] is not None else \
                f"mean distance {f['mean_distance']:g}"
            self.note(f"{r.device_id}: {stats.compared}/{self.policy.min_samples} requests compared, {agreement}, "
                      f"p95 {f['candidate_ms_p95']:.3g} ms (active {f['active_ms_p95']:.3g} ms)")
        r.verdict, r.reason = judge_device(r, self.policy, self.over_budget)
        if r.verdict is Verdict.UNDECIDED:
            r.reason = None  # still collecting
        else:
            self.note(f"{r.device_id}: {r.verdict.value}" + (f" ({r.reason})" if r.reason else ""))


def _counts(r: DeviceShadow, policy: ShadowPolicy) -> str:
    s = r.stats
    if s is None:
        return f"0 of {policy.min_samples} requests compared (it reported no counters)"
    return (f"{s.compared} of {policy.min_samples} requests compared ({s.offered} offered, {s.dropped} dropped, "
            f"{s.errors} failed)")


def shadow_stage(broker: BrokerConfig, prefix: str, candidate: Artifact, devices: list[str], timeout_s: float,
                 policy: ShadowPolicy, *, max_failure_fraction: float = 0.0, over_budget: OverBudget | None = None,
                 progress: Callable[[str, DeviceResult], None] | None = None,
                 note: Callable[[str], None] = lambda m: None) -> ShadowResult:
    """Shadow ``candidate`` (the shadow job, :func:`pipeline.bundle.shadow_artifact`) on ``devices`` and decide.
    ``timeout_s``: for the shadow job's delivery (the rollout's); ``policy.timeout_s`` for the samples after it.
    ``progress`` and ``note`` as for :func:`pipeline.ota.rollout.rollout`."""
    if candidate.manifest.shadow is None:
        raise ValueError(f"{candidate.dir.name}: its manifest has no shadow leaf; sign one with shadow_artifact")
    started = time.monotonic()
    v = candidate.version
    note(f"shadow: v{v} beside the active model on {', '.join(devices)} ({policy.sample:.0%} of live requests, at most "
         f"{policy.max_cpu:.0%} of a core), until {policy.min_samples} requests compared on each")
    result = ShadowResult(v, policy)
    result.delivered = deliver(broker, prefix, candidate, devices, timeout_s, progress, until=DeviceStatus.SHADOWING)
    result.timings["deliver"] = round(time.monotonic() - started, 2)
    shadowing = [r.device_id for r in result.delivered if r.status is DeviceStatus.SHADOWING]
    failed = [r for r in result.delivered if r.status is not DeviceStatus.SHADOWING]
    for r in failed:
        result.devices.append(DeviceShadow(r.device_id, Verdict.FAIL, f"did not reach shadowing: {r.status.value}"
                                                                      + (f" ({r.reason})" if r.reason else "")))
    if len(failed) > max_failure_fraction * len(devices):
        result.reason = (f"{len(failed)}/{len(devices)} devices did not reach shadowing ("
                         + ", ".join(f"{r.device_id}: {r.status.value}" for r in failed)
                         + f"); threshold {max_failure_fraction:.0%}")
    # a device that runs no model (a first deployment) serves no request to shadow: nothing to wait for there
    idle = [r.device_id for r in result.delivered if r.device_id in shadowing and r.active_version is None]
    for d in idle:
        result.devices.append(DeviceShadow(d, Verdict.SKIPPED, "runs no model: nothing to compare the candidate with"))
    judged = [d for d in shadowing if d not in idle]
    if judged and result.reason is None:
        collector = _Collector(prefix, v, judged, policy, over_budget, note)
        collecting = time.monotonic()
        _collect(broker, prefix, collector, policy)
        result.timings["samples"] = round(time.monotonic() - collecting, 2)
        ended = [r.device_id for r in collector.records.values()
                 if r.verdict is Verdict.FAIL or not r.online or r.left]
        for r in collector.records.values():
            if r.verdict is Verdict.UNDECIDED and r.reason is None:
                r.reason = (f"not judged: the stage ended on {', '.join(ended)} ({_counts(r, policy)})" if ended
                            else f"{_counts(r, policy)} in {policy.timeout_s:g} s")
        result.devices += collector.records.values()
        result.reason = decide(list(collector.records.values()))
    elif not shadowing and result.reason is None:
        result.reason = "no device is shadowing"
    result.devices.sort(key=lambda d: devices.index(d.device_id))
    result.promoted = result.reason is None
    if result.promoted:
        note(f"shadow: v{v} promoted ({'; '.join(_summary(d) for d in result.devices)})")
    else:
        note(f"shadow: v{v} not promoted: {result.reason}")
        dropping = time.monotonic()
        _drop(broker, prefix, result, shadowing, min(timeout_s, DROP_TIMEOUT_S), progress, note)
        result.timings["drop"] = round(time.monotonic() - dropping, 2)
    result.wall_s = round(time.monotonic() - started, 2)
    return result


def _summary(d: DeviceShadow) -> str:
    f = d.figures()
    if d.verdict is not Verdict.PASS:
        return f"{d.device_id}: {d.verdict.value}, {d.reason}"
    judged = f"agreement {f['agreement']:.1%}" if f.get("agreement") is not None else \
        f"mean distance {f.get('mean_distance')}"
    return f"{d.device_id}: {judged} over {f['samples']} requests"


def _collect(broker: BrokerConfig, prefix: str, collector: _Collector, policy: ShadowPolicy) -> None:
    leaves = (Leaf.METRICS, Leaf.STATUS, Leaf.EVENTS, Leaf.ONLINE)
    subs = [(topic(prefix, d, leaf), 1) for d in collector.records for leaf in leaves]
    deadline = time.monotonic() + policy.timeout_s
    # the counters only: no golden benchmark on the device at each ask (it ran one when it took the candidate)
    report = encode({"command": "report", "id": command_id("report"), "fresh": False})
    # retained messages too: a device that went offline (or left shadowing) since its delivery ended says so there
    with Watch(broker, prefix, subs, collector.handle, name="host-shadow") as watch:
        while True:
            for d in collector.waiting():  # the agent sends its counters with the metrics it sends when asked
                watch.publish(topic(prefix, d, Leaf.CMD), report, qos=1)
            left = deadline - time.monotonic()
            # report_every_s is a poll interval: how often the devices are asked, the wait ends on what they say
            if left <= 0 or watch.until(collector.settled, min(policy.report_every_s, left)):
                return


def _drop(broker: BrokerConfig, prefix: str, result: ShadowResult, shadowing: list[str], timeout_s: float,
          progress: Callable[[str, DeviceResult], None] | None, note: Callable[[str], None]) -> None:
    """``drop_shadow`` to each shadowing device, and what each one answered, in its delivery result; every chosen
    device's retained job cleared, so that none starts the candidate later with nobody deciding. A device that went
    offline is sent the command too (its session keeps it until it is back), but not waited for."""
    by_id = {r.device_id: r for r in result.delivered}
    offline = {d.device_id for d in result.devices if not d.online}
    online = [d for d in shadowing if d not in offline]
    if online:
        note(f"asking {', '.join(online)} to drop v{result.candidate}")
        for a in command(broker, prefix, online, "drop_shadow", DROP_ANSWERS, timeout_s):
            r = by_id[a.device_id]
            r.status, r.reason = a.status, f"shadow stage: {result.reason}; {a.message or a.status.value}"
            if a.active_version is not None:
                r.active_version = a.active_version
            r.device_state = a.state or r.device_state
            if a.event is not None:
                r.events.append(a.event)
            note(f"{r.device_id}: {a.status.value} (active v{r.active_version})")
            if progress is not None:
                progress(a.status.value, r)
    for d in (d for d in shadowing if d in offline):
        r = by_id[d]
        r.status = DeviceStatus.NO_ANSWER
        r.reason = (f"shadow stage: {result.reason}; offline: the drop_shadow command waits for it at the broker, "
                    "what it runs is unknown")
        if progress is not None:
            progress(r.status.value, r)
    for r in result.delivered:
        if r.device_id not in shadowing:
            r.reason = f"shadow stage: {result.reason}; {r.status.value}: {r.reason or 'no reason given'}"
    with Watch(broker, prefix, [], lambda name, payload: None, name="host-shadow-clear") as watch:
        for d in shadowing:
            if d in offline:
                watch.publish(topic(prefix, d, Leaf.CMD), encode({"command": "drop_shadow",
                                                                 "id": command_id("drop_shadow")}), qos=1)
        for r in result.delivered:
            watch.publish(topic(prefix, r.device_id, Leaf.JOB), b"", qos=1, retain=True)
