"""How good the served model is on live traffic: the schemas both ends share, and the agent's bounded counters.

Three things travel with an agent's metrics (``device_agent.protocol.Metrics``), each a plain JSON object:

- ``drift``: the active version's :class:`device_agent.drift.DriftScores` (``{"version": V, ...scores}``).
- ``accuracy``: live accuracy where the device's application knows the truth. It posts the true label of a
  request it was answered (``POST /v1/feedback {"id": REQUEST_ID, "label": INDEX or CLASS NAME}``) within
  ``window_s`` of the answer; per version the agent counts ``labelled`` and ``correct`` (the top-1 class
  against the label), and a shadowed request counts for the candidate too. ``{"versions": {"V": {"labelled",
  "correct"}}, "unmatched": N, "window_s": S}``: ``unmatched`` counts feedback for an id it no longer holds
  (unknown, expired, already labelled).
- ``shadow``: a candidate run off the request path on sampled live requests, against the active model
  (:class:`ShadowStats`): requests ``offered`` (sampled), ``compared``, ``dropped`` (the shadow worker busy or
  over its CPU share), ``errors``; for classifiers ``agree`` (same top-1), for other outputs the max and mean
  absolute output distance; both models' latency histograms over ``device_agent.serving.BUCKETS_MS``.

A manifest may carry ``shadow`` (:class:`Shadow`): the candidate is installed and health-checked but not
activated; the agent shadows ``sample`` of the live requests with it, using at most ``max_cpu`` of one core.

The host's parsers (``*.from_dict``) are total: any value gives the object or ProtocolError naming the field.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError
from .protocol import short

#: latency histogram bucket bounds, ms (fixed, so histograms from any device add up on the host); +Inf is implied.
#: The inference API's traffic (device_agent.serving) and the shadow's comparisons count over them.
BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
HISTOGRAM = len(BUCKETS_MS) + 1
_VERSION_KEY = re.compile(r"[0-9]{1,19}")

#: requests the agent remembers for feedback, and for how long
MAX_PENDING, FEEDBACK_WINDOW_S = 10_000, 600.0
#: versions one accuracy snapshot carries at most (the agent keeps the latest)
MAX_VERSIONS = 8
MAX_COUNT = 2**53


def _count(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_COUNT:
        raise ProtocolError(f"{where}: expected a count in [0, 2**53), got {short(v, 40)}")
    return v


def _number(v: Any, where: str, low: float = 0.0, high: float = 1e300, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not low <= v <= high:
        raise ProtocolError(f"{where}: expected a number in [{low:g}, {high:g}], got {short(v, 40)}")
    return float(v)


def _version(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
        raise ProtocolError(f"{where}: expected a model version, got {short(v, 40)}")
    return v


def _keys(obj: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise ProtocolError(f"{where}: unknown key {short(unknown[0], 40)}; known: {', '.join(known)}")
    return obj


# --------------------------------------------------------------------------- the manifest's shadow leaf

@dataclass(frozen=True)
class Shadow:
    """Signed into a candidate's manifest: shadow ``sample`` of the live requests, with at most ``max_cpu`` of
    one core (the worker rests after each run so that its runs take at most that share of its time)."""

    sample: float = 0.1
    max_cpu: float = 0.25

    KEYS = ("sample", "max_cpu")

    @classmethod
    def from_dict(cls, obj: Any, where: str = "manifest: shadow") -> "Shadow":
        obj = _keys(obj, cls.KEYS, where)
        sample = _number(obj.get("sample", 0.1), f"{where}.sample", 0.0, 1.0)
        max_cpu = _number(obj.get("max_cpu", 0.25), f"{where}.max_cpu", 0.0, 1.0)
        if sample == 0 or max_cpu == 0:
            raise ProtocolError(f"{where}: sample and max_cpu must be above 0 (a shadow that never runs)")
        return cls(sample, max_cpu)

    def to_dict(self) -> dict[str, Any]:
        return {"sample": self.sample, "max_cpu": self.max_cpu}


# --------------------------------------------------------------------------- live accuracy

class LiveAccuracy:
    """Top-1 answers waiting for their label (at most MAX_PENDING, for FEEDBACK_WINDOW_S), and per version how
    many were labelled and right. Thread-safe; memory bounded by MAX_PENDING entries."""

    def __init__(self, max_pending: int = MAX_PENDING, window_s: float = FEEDBACK_WINDOW_S,
                 clock=time.monotonic) -> None:
        self.max_pending, self.window_s, self._clock = max_pending, window_s, clock
        # id -> (t, version, top1, version, top1, ...): a flat tuple, ~200 bytes less an entry than a dict in it
        self._pending: OrderedDict[str, tuple] = OrderedDict()
        self._versions: OrderedDict[int, list[int]] = OrderedDict()  # version -> [labelled, correct], last used last
        self.unmatched = 0
        self._lock = threading.Lock()

    def answered(self, rid: str, version: int | None, top1: int | None) -> None:
        """The answer ``version`` gave request ``rid`` (its top-1 class, or None for a model that has none)."""
        if version is None or top1 is None:
            return
        now = self._clock()
        with self._lock:
            entry = self._pending.pop(rid, None)  # an id used again: its answers go to the tail, timed now
            answers = tuple(x for k in range(1, len(entry), 2) if entry[k] != version
                            for x in entry[k:k + 2]) if entry is not None else ()
            self._pending[rid] = (now, *answers[-6:], version, top1)
            self._expire(now)

    def also(self, rid: str, version: int, top1: int | None) -> None:
        """A shadow candidate's answer to a request already answered (it counts only if still waiting)."""
        if top1 is None:
            return
        with self._lock:
            entry = self._pending.get(rid)
            if entry is not None and len(entry) < 9 and version not in entry[1::2]:
                self._pending[rid] = (*entry, version, top1)

    def feedback(self, rid: str, label: int) -> dict[str, bool] | None:
        """The true class of request ``rid``: per version that answered it whether it was right; None when the
        id is not waiting (unknown, expired, labelled already)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._pending.pop(rid, None)
            if entry is None:
                self.unmatched += 1
                return None
            out = {}
            for version, top1 in zip(entry[1::2], entry[2::2]):
                counts = self._versions.setdefault(version, [0, 0])
                self._versions.move_to_end(version)
                counts[0] += 1
                counts[1] += int(top1 == label)
                out[str(version)] = top1 == label
            while len(self._versions) > MAX_VERSIONS:  # the version labelled longest ago goes first
                self._versions.popitem(last=False)
            return out

    def _expire(self, now: float) -> None:
        while self._pending:
            rid, (t, *_) = next(iter(self._pending.items()))
            if len(self._pending) <= self.max_pending and now - t <= self.window_s:
                break
            del self._pending[rid]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            if not self._versions and not self.unmatched:
                return None
            return {"versions": {str(v): {"labelled": c[0], "correct": c[1]} for v, c in self._versions.items()},
                    "unmatched": self.unmatched, "window_s": self.window_s}

    @staticmethod
    def from_dict(obj: Any, where: str = "metrics: accuracy") -> dict[str, Any]:
        """The host's parse: ``{"versions": {V: {"labelled", "correct"}}, "unmatched", "window_s"}``."""
        obj = _keys(obj, ("versions", "unmatched", "window_s"), where)
        versions = obj.get("versions", {})
        if not isinstance(versions, dict) or len(versions) > MAX_VERSIONS:
            raise ProtocolError(f"{where}.versions: expected an object of at most {MAX_VERSIONS} versions")
        out: dict[int, dict[str, int]] = {}
        for key, counts in versions.items():
            if not isinstance(key, str) or not _VERSION_KEY.fullmatch(key) or int(key) >= 2**63:
                raise ProtocolError(f"{where}.versions: key {short(key, 30)} is not a version")
            counts = _keys(counts, ("labelled", "correct"), f"{where}.versions.{key}")
            labelled = _count(counts.get("labelled"), f"{where}.versions.{key}.labelled")
            correct = _count(counts.get("correct"), f"{where}.versions.{key}.correct")
            if correct > labelled:
                raise ProtocolError(f"{where}.versions.{key}: {correct} correct of {labelled} labelled")
            out[int(key)] = {"labelled": labelled, "correct": correct}
        return {"versions": out, "unmatched": _count(obj.get("unmatched", 0), f"{where}.unmatched"),
                "window_s": _number(obj.get("window_s", FEEDBACK_WINDOW_S), f"{where}.window_s", 0, 1e9)}


# --------------------------------------------------------------------------- shadow comparisons

def _finite(v: float) -> float | None:
    """Six significant digits, or None for what JSON cannot carry (the host would refuse the whole message)."""
    return float(f"{v:.6g}") if math.isfinite(v) else None


@dataclass
class ShadowStats:
    """The agent's counters for one candidate against the active model (cumulative since shadowing began, within one
    agent start: a restart counts from zero, and the host adds each start's counters, :meth:`plus`)."""

    candidate: int
    active: int | None
    sample: float
    offered: int = 0
    compared: int = 0
    dropped: int = 0
    errors: int = 0
    agree: int = 0
    top1: bool = True  # the outputs are class scores: agreement is top-1; else distances only
    max_distance: float = 0.0
    sum_distance: float = 0.0
    active_ms: list[int] = field(default_factory=lambda: [0] * HISTOGRAM)
    candidate_ms: list[int] = field(default_factory=lambda: [0] * HISTOGRAM)
    #: both models timed alike when the candidate was installed (golden inputs, the serving thread count, normal
    #: priority): ``candidate_p50_ms``, ``candidate_p95_ms``, ``active_p50_ms``, ``active_p95_ms``, ``runs``,
    #: ``threads``. The histograms above time the candidate on the shadow's low-priority thread, beside the
    #: traffic: what it cost there, not how fast it would serve.
    bench: dict[str, Any] | None = None

    KEYS = ("candidate", "active", "sample", "offered", "compared", "dropped", "errors", "agree", "top1",
            "max_distance", "mean_distance", "active_ms", "candidate_ms", "bench")
    BENCH_KEYS = ("candidate_p50_ms", "candidate_p95_ms", "active_p50_ms", "active_p95_ms", "runs", "threads")

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "active": self.active, "sample": self.sample, "offered": self.offered,
                "compared": self.compared, "dropped": self.dropped, "errors": self.errors, "agree": self.agree,
                "top1": self.top1, "max_distance": _finite(self.max_distance) or 0.0,
                "mean_distance": _finite(self.sum_distance / self.compared) if self.compared else None,
                "active_ms": list(self.active_ms), "candidate_ms": list(self.candidate_ms),
                **({"bench": dict(self.bench)} if self.bench is not None else {})}

    def plus(self, later: "ShadowStats") -> "ShadowStats":
        """These counters and ``later``'s (the same candidate's, counted since a later agent start) together: what
        was counted adds up; the active version, sample and benchmark are the later ones."""
        return ShadowStats(
            candidate=self.candidate, active=later.active, sample=later.sample,
            offered=self.offered + later.offered, compared=self.compared + later.compared,
            dropped=self.dropped + later.dropped, errors=self.errors + later.errors, agree=self.agree + later.agree,
            top1=self.top1 and later.top1, max_distance=max(self.max_distance, later.max_distance),
            sum_distance=self.sum_distance + later.sum_distance,
            active_ms=[a + b for a, b in zip(self.active_ms, later.active_ms)],
            candidate_ms=[a + b for a, b in zip(self.candidate_ms, later.candidate_ms)],
            bench=later.bench if later.bench is not None else self.bench)

    @property
    def agreement(self) -> float | None:
        return self.agree / self.compared if self.compared and self.top1 else None

    @classmethod
    def from_dict(cls, obj: Any, buckets: int = HISTOGRAM, where: str = "metrics: shadow") -> "ShadowStats":
        """The host's parse; ``buckets``: the histogram length (len(BUCKETS_MS) + 1)."""
        obj = _keys(obj, cls.KEYS, where)
        active = obj.get("active")
        counts = {k: _count(obj.get(k, 0), f"{where}.{k}") for k in ("offered", "compared", "dropped", "errors",
                                                                      "agree")}
        if counts["agree"] > counts["compared"] or counts["compared"] + counts["errors"] > counts["offered"]:
            raise ProtocolError(f"{where}: {counts['agree']} agree of {counts['compared']} compared, "
                                f"{counts['errors']} errors of {counts['offered']} offered")
        top1 = obj.get("top1", True)
        if not isinstance(top1, bool):
            raise ProtocolError(f"{where}.top1: expected true or false, got {short(top1, 40)}")
        hists = {}
        for key in ("active_ms", "candidate_ms"):
            h = obj.get(key, [0] * buckets)
            if not isinstance(h, list) or len(h) != buckets:
                raise ProtocolError(f"{where}.{key}: expected {buckets} bucket counts")
            hists[key] = [_count(c, f"{where}.{key}") for c in h]
        mean = _number(obj.get("mean_distance"), f"{where}.mean_distance", optional=True)
        if mean is not None and not math.isfinite(mean * counts["compared"]):
            raise ProtocolError(f"{where}.mean_distance: {short(mean, 40)} over {counts['compared']} comparisons")
        bench = obj.get("bench")
        if bench is not None:
            bench = _keys(bench, cls.BENCH_KEYS, f"{where}.bench")
            bench = {k: _number(bench.get(k), f"{where}.bench.{k}", 0.0, 1e9, optional=k == "threads")
                     for k in cls.BENCH_KEYS}  # threads null: the runtime's own default
        return cls(candidate=_version(obj.get("candidate"), f"{where}.candidate"), bench=bench,
                   active=None if active is None else _version(active, f"{where}.active"),
                   sample=_number(obj.get("sample", 0.0), f"{where}.sample", 0.0, 1.0), top1=top1,
                   max_distance=_number(obj.get("max_distance", 0.0), f"{where}.max_distance"),
                   sum_distance=(mean or 0.0) * counts["compared"], **counts, **hists)
