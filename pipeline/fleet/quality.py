"""How good each device's model is on its live traffic, from what the agents report with their metrics
(``device_agent.drift``, ``device_agent.quality``): the one computation ``pipeline fleet drift``, ``fleet status``,
the dashboard's quality panel and ``/metrics`` all show (``quality_summary``).

Three optional values of a metrics message, each read by the schema both ends share:

- ``drift``: the active version's ``DriftScores`` over the agent's window (``{"version": V, ...}``). The store
  keeps the latest per (device, version) in the device's own order (boot, seq), with its state under deploy.yaml's
  ``drift:`` thresholds: ``collecting`` (fewer than ``min_samples`` samples in the window), ``ok``, or ``drifting``
  (which scores are above their thresholds, by how much). A (device, version) that crosses into drift records a
  ``drift_detected`` event in the store's events table, one that comes back ``drift_cleared``: once per crossing,
  never per report (a window that starts again after a restart is ``collecting`` and changes neither).
- ``accuracy``: per version ``labelled``/``correct`` from the application's feedback, cumulative within one agent
  boot: one row per (device, boot, version) whose totals grow by what each snapshot adds to the previous one (a
  counter that went down, a version the agent dropped and took again, adds the snapshot whole), summed over boots,
  as ``pipeline.fleet.traffic`` keeps requests. ``unmatched`` feedback per (device, boot), likewise summed.
- ``shadow``: a candidate's comparison with the active model, cumulative since shadowing began within a boot: one
  row per (device, boot, candidate), grown the same way; latency percentiles come from the merged histograms by
  the agent's own ``quantile_ms``.

``ingest`` records a batch beside ``FleetStore.ingest`` (the ingester calls both; a batch the broker delivers
again changes nothing, since every row follows the device's (boot, seq)). Nothing a device sends stops it: a value
its schema refuses is left out and counted by ``Skip`` (the ingester exports the counts)."""

from __future__ import annotations

import enum
import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from device_agent.drift import DriftScores, Thresholds, events
from device_agent.errors import ProtocolError
from device_agent.quality import LiveAccuracy, ShadowStats
from device_agent.serving import BUCKETS_MS, quantile_ms

from .sql import Connection, upsert
from .store import WRITERS_LOCK, clean, order

if TYPE_CHECKING:
    from .store import FleetStore

#: a total at or above this is refused: what a float holds exactly (Prometheus samples are floats)
MAX_COUNT = 2**53
#: a model version SQLite's INTEGER holds
_INT64 = 2**63
#: buckets of a shadow latency histogram: BUCKETS_MS and +Inf
HISTOGRAM = len(BUCKETS_MS) + 1
#: what the shared parsers raise on a value they refuse; besides ProtocolError, what a parser that is not quite total
#: lets out (LiveAccuracy.from_dict: int() of a key str.isdigit() took, such as "²"), counted the same way
_REFUSED = (ProtocolError, ValueError, TypeError, OverflowError, RecursionError)
FIELDS = ("drift", "accuracy", "shadow")
DETECTED, CLEARED = "drift_detected", "drift_cleared"
SCORES = ("psi_outputs", "psi_confidence", "mean_shift")


class Skip(str, enum.Enum):
    """Why a quality value was left out: the ``reason`` label of ``edgefleet_ingest_quality_skipped_total``."""

    DRIFT = "drift"  # a drift value DriftScores.from_dict refuses
    ACCURACY = "accuracy"  # an accuracy value LiveAccuracy.from_dict refuses, a version beyond 64 bits, or totals
    #                        that would pass 2**53
    SHADOW = "shadow"  # a shadow value ShadowStats.from_dict refuses, or totals past 2**53 or not finite
    VERSION = "version"  # drift scores that name no model version
    ORDER = "order"  # accuracy or shadow counters in a message without (boot, seq): not told from a restart's


class State(str, enum.Enum):
    """A (device, version)'s drift under the thresholds it was recorded with."""

    COLLECTING = "collecting"  # the window holds fewer than min_samples samples: no verdict yet
    OK = "ok"
    DRIFTING = "drifting"


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_COUNT else None


def _is_version(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _INT64


def _later(boot: int | None, seq: int | None, row_boot: Any, row_seq: Any) -> bool:
    """A message applies when it or the row has no order, or when it comes after the row's (boot, seq)."""
    if boot is None or seq is None or not isinstance(row_boot, int) or not isinstance(row_seq, int):
        return True
    return (boot, seq) > (row_boot, row_seq)


# --------------------------------------------------------------------------- a shadow comparison's totals

@dataclass(frozen=True)
class Comparison:
    """A candidate's counters against the active model (``ShadowStats`` as totals that add up)."""

    offered: int = 0
    compared: int = 0
    dropped: int = 0
    errors: int = 0
    agree: int = 0
    sum_distance: float = 0.0
    max_distance: float = 0.0
    active_ms: tuple[int, ...] = (0,) * HISTOGRAM
    candidate_ms: tuple[int, ...] = (0,) * HISTOGRAM

    COUNTERS = ("offered", "compared", "dropped", "errors", "agree")

    @classmethod
    def of(cls, s: ShadowStats) -> "Comparison":
        return cls(s.offered, s.compared, s.dropped, s.errors, s.agree, s.sum_distance, s.max_distance,
                   tuple(s.active_ms), tuple(s.candidate_ms))

    def __add__(self, o: "Comparison") -> "Comparison":
        return Comparison(*(getattr(self, k) + getattr(o, k) for k in self.COUNTERS),
                          self.sum_distance + o.sum_distance, max(self.max_distance, o.max_distance),
                          tuple(a + b for a, b in zip(self.active_ms, o.active_ms)),
                          tuple(a + b for a, b in zip(self.candidate_ms, o.candidate_ms)))

    def consistent(self) -> bool:
        """What the schema holds of one snapshot: agree <= compared, compared + errors <= offered."""
        return self.agree <= self.compared and self.compared + self.errors <= self.offered

    def since(self, before: "Comparison") -> "Comparison":
        """What this snapshot added to ``before``; all of it when a counter went down (shadowing began again) or
        the difference is not itself a consistent set of counts."""
        d = Comparison(*(getattr(self, k) - getattr(before, k) for k in self.COUNTERS),
                       max(0.0, self.sum_distance - before.sum_distance), self.max_distance,
                       tuple(a - b for a, b in zip(self.active_ms, before.active_ms)),
                       tuple(a - b for a, b in zip(self.candidate_ms, before.candidate_ms)))
        negative = any(getattr(d, k) < 0 for k in self.COUNTERS) or min(d.active_ms + d.candidate_ms) < 0
        return self if negative or not d.consistent() else d

    def bounded(self) -> bool:
        return (all(getattr(self, k) < MAX_COUNT for k in self.COUNTERS)
                and max(self.active_ms + self.candidate_ms) < MAX_COUNT
                and math.isfinite(self.sum_distance) and math.isfinite(self.max_distance))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, text: Any) -> "Comparison | None":
        """A row's JSON, checked as on the way in (a row another writer left unreadable: None)."""
        try:
            obj = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or set(obj) != set(cls.__dataclass_fields__):
            return None
        counts = [_count(obj[k]) for k in cls.COUNTERS]
        hists = [obj[k] if isinstance(obj[k], list) and len(obj[k]) == HISTOGRAM else None
                 for k in ("active_ms", "candidate_ms")]
        floats = [obj[k] for k in ("sum_distance", "max_distance")]
        if None in counts or None in hists or any(_count(n) is None for h in hists for n in h) or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f >= 0
                for f in floats):
            return None
        c = cls(*counts, float(floats[0]), float(floats[1]), tuple(hists[0]), tuple(hists[1]))
        return c if c.consistent() else None


# --------------------------------------------------------------------------- the store's side

def ingest(store: "FleetStore", messages: list[tuple[str, str, dict[str, Any]]], thresholds: Thresholds | None = None,
           now: float | None = None, skipped: Counter | None = None) -> int:
    """Record the quality values of a batch of (device_id, kind, body), as ``FleetStore.ingest`` takes them, in one
    transaction; returns the drift events recorded. What it leaves out is added to ``skipped`` (by ``Skip``) once
    committed. ``thresholds``: deploy.yaml's ``drift:`` (``cfg.drift.thresholds()``); none: the defaults."""
    thresholds = thresholds or Thresholds()
    now = time.time() if now is None else now
    todo = [(device, clean(body)) for device, kind, body in messages
            if kind == "metrics" and any(body.get(k) is not None for k in FIELDS)]
    if not todo:
        return 0
    skips: Counter = Counter()
    recorded = 0
    todo.sort(key=lambda m: m[0])  # by device, each device's in arrival order: see sql.Connection.lock_each
    with store.db.transaction(immediate=True) as db:
        db.lock(WRITERS_LOCK, shared=True)
        db.lock_each(device for device, _ in todo)
        for device, body in todo:
            recorded += record(db, device, *order(body), now, body.get("ts") or now, body, thresholds, skips)
    if skipped is not None:
        skipped.update(skips)
    return recorded


def record(db: Connection, device: str, boot: int | None, seq: int | None, now: float, ts: float,
           body: dict[str, Any], thresholds: Thresholds, skipped: Counter) -> int:
    """One metrics message's quality values (inside the caller's transaction); returns the events recorded.
    ``now``: the host's time of storing; ``ts``: the message's (its events are dated by it, as the device's own)."""
    recorded = 0
    if body.get("drift") is not None:
        recorded += _drift(db, device, boot, seq, now, ts, body["drift"], thresholds, skipped)
    if body.get("accuracy") is not None:
        _accuracy(db, device, boot, seq, now, body["accuracy"], skipped)
    if body.get("shadow") is not None:
        _shadow(db, device, boot, seq, now, body["shadow"], skipped)
    return recorded


def forget(db: Connection, before: float) -> dict[str, int]:
    """Retention, inside the caller's transaction: quality rows no report has updated since ``before`` (the
    rollups' window) go, as traffic's do; a device's current figures are always newer than that."""
    dropped = 0
    for table in ("quality_drift", "quality_accuracy", "quality_accuracy_boots", "quality_shadow"):
        dropped += int(db.execute(f"DELETE FROM {table} WHERE ts < ?", (before,)).rowcount)
    return {"quality_rows_dropped": dropped}


def state(scores: DriftScores, above: list[dict[str, Any]], thresholds: Thresholds) -> State:
    if scores.samples < thresholds.min_samples:
        return State.COLLECTING
    return State.DRIFTING if above else State.OK


def _score_text(name: str, value: float, limit: float, channel: int | None = None) -> str:
    where = f" (channel {channel})" if channel is not None else ""
    return f"{name} {value:.4g} {'>' if value > limit else '<='} {limit:g}{where}"


def event_message(kind: str, device: str, version: int, scores: DriftScores, above: list[dict[str, Any]],
                  thresholds: Thresholds) -> str:
    """What a drift event says: the device, the version, each score against its threshold, the window's samples."""
    if kind == DETECTED:
        parts = [_score_text(e["score"], e["value"], e["threshold"], e.get("channel")) for e in above]
    else:
        values = {"psi_outputs": scores.psi_outputs, "psi_confidence": scores.psi_confidence,
                  "mean_shift": scores.max_mean_shift}
        parts = [_score_text(name, values[name], getattr(thresholds, name)) for name in SCORES
                 if values[name] is not None]
    what = "drift detected" if kind == DETECTED else "drift cleared"
    return f"{what} on {device} v{version}: {', '.join(parts)} ({scores.samples} samples in the window)"


_DRIFT_ROW = upsert("quality_drift", ("device_id", "version", "boot", "seq", "ts", "scores", "state", "drifting",
                                     "thresholds", "alarm"), ("device_id", "version"))
_ACCURACY_BOOT_ROW = upsert("quality_accuracy_boots", ("device_id", "boot", "seq", "ts", "unmatched", "window_s"),
                            ("device_id", "boot"))
_ACCURACY_ROW = upsert("quality_accuracy", ("device_id", "boot", "version", "ts", "labelled", "correct", "last_labelled",
                                            "last_correct"), ("device_id", "boot", "version"))
_SHADOW_ROW = upsert("quality_shadow", ("device_id", "boot", "candidate", "seq", "ts", "active", "sample", "top1",
                                        "total", "last"), ("device_id", "boot", "candidate"))


def _drift(db: Connection, device: str, boot: int | None, seq: int | None, now: float, ts: float,
           value: Any, thresholds: Thresholds, skipped: Counter) -> int:
    try:
        scores = DriftScores.from_dict(value)
    except _REFUSED:
        skipped[Skip.DRIFT] += 1
        return 0
    version = value.get("version")
    if not _is_version(version):
        skipped[Skip.VERSION] += 1
        return 0
    row = db.execute("SELECT boot, seq, alarm FROM quality_drift WHERE device_id = ? AND version = ?",
                     (device, version)).fetchone()
    if row is not None and not _later(boot, seq, row[0], row[1]):
        return 0  # a redelivery, or a report older than the stored one
    above = events(scores, thresholds)
    now_state = state(scores, above, thresholds)
    alarm = row is not None and row[2] == 1
    kind = (DETECTED if now_state is State.DRIFTING and not alarm
            else CLEARED if now_state is State.OK and alarm else None)
    recorded = 0
    if kind is not None:
        recorded = db.execute(
            "INSERT OR IGNORE INTO events (device_id, ts, kind, message, job_id, version) VALUES (?,?,?,?,NULL,?)",
            (device, ts, kind, event_message(kind, device, version, scores, above, thresholds), version)).rowcount
        alarm = kind == DETECTED
    db.execute(_DRIFT_ROW,
               (device, version, boot, seq, now, json.dumps(scores.to_dict()), now_state.value, json.dumps(above),
                json.dumps(thresholds.to_dict()), int(alarm)))
    return recorded


def _accuracy(db: Connection, device: str, boot: int | None, seq: int | None, now: float, value: Any,
              skipped: Counter) -> None:
    try:
        parsed = LiveAccuracy.from_dict(value)
    except _REFUSED:
        skipped[Skip.ACCURACY] += 1
        return
    versions = {v: c for v, c in parsed["versions"].items() if _is_version(v)}
    if len(versions) < len(parsed["versions"]):  # a key of 19 digits past 2**63
        skipped[Skip.ACCURACY] += len(parsed["versions"]) - len(versions)
    if boot is None or seq is None:
        skipped[Skip.ORDER] += 1
        return
    row = db.execute("SELECT seq FROM quality_accuracy_boots WHERE device_id = ? AND boot = ?",
                     (device, boot)).fetchone()
    if row is not None and isinstance(row[0], int) and seq <= row[0]:
        return  # a redelivery, or a snapshot the stored one already holds
    db.execute(_ACCURACY_BOOT_ROW, (device, boot, seq, now, parsed["unmatched"], parsed["window_s"]))
    for version, c in versions.items():
        labelled, correct = c["labelled"], c["correct"]
        stored = db.execute("SELECT labelled, correct, last_labelled, last_correct FROM quality_accuracy "
                            "WHERE device_id = ? AND boot = ? AND version = ?", (device, boot, version)).fetchone()
        held = tuple(_count(v) for v in stored) if stored is not None else (None,) * 4
        if None in held or held[1] > held[0] or held[3] > held[2]:  # a new row (or one written around the store)
            total = (labelled, correct)
        else:
            grew = (labelled - held[2], correct - held[3])
            if grew[0] < 0 or grew[1] < 0 or grew[1] > grew[0]:  # started again: the agent dropped the version and
                grew = (labelled, correct)  # took it again, or the difference is not a count of right answers
            total = (held[0] + grew[0], held[1] + grew[1])
        if total[0] >= MAX_COUNT:
            skipped[Skip.ACCURACY] += 1
            continue
        db.execute(_ACCURACY_ROW,
                   (device, boot, version, now, *total, labelled, correct))


def _shadow(db: Connection, device: str, boot: int | None, seq: int | None, now: float, value: Any,
            skipped: Counter) -> None:
    try:
        stats = ShadowStats.from_dict(value, HISTOGRAM)
    except _REFUSED:
        skipped[Skip.SHADOW] += 1
        return
    if boot is None or seq is None:
        skipped[Skip.ORDER] += 1
        return
    new = Comparison.of(stats)
    row = db.execute("SELECT seq, total, last FROM quality_shadow WHERE device_id = ? AND boot = ? AND candidate = ?",
                     (device, boot, stats.candidate)).fetchone()
    if row is not None and isinstance(row[0], int) and seq <= row[0]:
        return
    total, last = (Comparison.load(row[1]), Comparison.load(row[2])) if row is not None else (None, None)
    grown = (total or Comparison()) + (new.since(last) if last is not None and total is not None else new)
    if not grown.bounded() or not new.bounded():
        skipped[Skip.SHADOW] += 1
        return
    db.execute(_SHADOW_ROW,
               (device, boot, stats.candidate, seq, now, stats.active, stats.sample, int(stats.top1), grown.to_json(),
                new.to_json()))


# --------------------------------------------------------------------------- the views' side

def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _latest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _drift_row(r: Any) -> dict[str, Any] | None:
    """A drift row as the views show it, or None when another writer left it unreadable."""
    try:
        scores = DriftScores.from_dict(json.loads(r["scores"]))
        drifting, limits = json.loads(r["drifting"] or "[]"), Thresholds.from_dict(json.loads(r["thresholds"]))
    except (*_REFUSED, KeyError):
        return None
    if r["state"] not in {s.value for s in State} or not isinstance(drifting, list) \
            or not all(isinstance(e, dict) and e.get("score") in SCORES for e in drifting):
        return None
    return {**scores.to_dict(), "state": r["state"], "drifting": drifting, "thresholds": limits.to_dict(),
            "ts": _number(r["ts"])}


def _percentiles(prefix: str, buckets: tuple[int, ...]) -> dict[str, float | None]:
    return {f"{prefix}_p50_ms": quantile_ms(list(buckets), 0.5), f"{prefix}_p95_ms": quantile_ms(list(buckets), 0.95)}


def comparison_figures(c: Comparison, top1: bool) -> dict[str, Any]:
    """What every view shows of a candidate's comparison."""
    return {"offered": c.offered, "compared": c.compared, "dropped": c.dropped, "errors": c.errors,
            "agree": c.agree if top1 else None, "agreement": c.agree / c.compared if top1 and c.compared else None,
            "max_distance": c.max_distance, "mean_distance": c.sum_distance / c.compared if c.compared else None,
            **_percentiles("active", c.active_ms), **_percentiles("candidate", c.candidate_ms),
            "active_ms": list(c.active_ms), "candidate_ms": list(c.candidate_ms)}


def quality_summary(store: "FleetStore", device: str | None = None) -> dict[str, Any]:
    """Per device (``device``: that one only): per version its latest drift scores and state and its live accuracy
    summed over boots; per candidate shadowed its comparison summed over boots. Rows another writer left
    unreadable are counted in ``unreadable``, never raised."""
    where, args = (" WHERE device_id = ?", (device,)) if device is not None else ("", ())
    db = store.db
    targets = {r[0]: r[1] if isinstance(r[1], str) else None
               for r in db.execute("SELECT device_id, target FROM devices" + where, args)}
    unreadable = 0
    versions: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in db.execute("SELECT * FROM quality_drift" + where, args):
        drift = _drift_row(r)
        if drift is None or not isinstance(r["device_id"], str) or not _is_version(r["version"]):
            unreadable += 1
            continue
        versions[r["device_id"]].setdefault(r["version"], {})["drift"] = drift
    accuracy: dict[tuple[str, int], list[Any]] = {}
    for r in db.execute("SELECT device_id, version, ts, labelled, correct FROM quality_accuracy" + where, args):
        labelled, correct = _count(r[3]), _count(r[4])
        if labelled is None or correct is None or correct > labelled or not isinstance(r[0], str) \
                or not _is_version(r[1]):
            unreadable += 1
            continue
        a = accuracy.setdefault((r[0], r[1]), [0, 0, None])
        a[0], a[1] = a[0] + labelled, a[1] + correct
        a[2] = _latest(a[2], _number(r[2]))
    for (d, v), (labelled, correct, ts) in accuracy.items():
        versions[d].setdefault(v, {})["accuracy"] = {"labelled": labelled, "correct": correct,
                                                     "accuracy": correct / labelled if labelled else None, "ts": ts}
    feedback: dict[str, dict[str, Any]] = {}
    for r in db.execute("SELECT device_id, boot, unmatched, window_s FROM quality_accuracy_boots" + where
                        + " ORDER BY boot", args):
        if not isinstance(r[0], str):
            unreadable += 1
            continue
        f = feedback.setdefault(r[0], {"unmatched": 0, "window_s": None})
        f["unmatched"] += _count(r[2]) or 0
        f["window_s"] = _number(r[3]) if _number(r[3]) is not None else f["window_s"]
    shadows: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in db.execute("SELECT device_id, boot, candidate, ts, active, sample, top1, total FROM quality_shadow"
                        + where + " ORDER BY boot", args):
        c = Comparison.load(r["total"])
        if c is None or not isinstance(r["device_id"], str) or not _is_version(r["candidate"]):
            unreadable += 1
            continue
        s = shadows[r["device_id"]].setdefault(r["candidate"], {"sum": Comparison(), "ts": None})
        s["sum"] += c
        s.update(active=r["active"] if _is_version(r["active"]) else None, sample=_number(r["sample"]),
                 top1=bool(r["top1"]), ts=_latest(s["ts"], _number(r["ts"])))
    devices = []
    for d in sorted(versions.keys() | shadows.keys() | feedback.keys()):
        mine = versions.get(d, {})
        devices.append({
            "device_id": d, "target": targets.get(d),
            "versions": [{"version": v, "drift": e.get("drift"), "accuracy": e.get("accuracy")}
                         for v, e in sorted(mine.items())],
            "unmatched": feedback.get(d, {}).get("unmatched", 0), "window_s": feedback.get(d, {}).get("window_s"),
            "shadow": [{"candidate": cand, "active": s["active"], "sample": s["sample"], "top1": s["top1"],
                        **comparison_figures(s["sum"], s["top1"]), "ts": s["ts"]}
                       for cand, s in sorted(shadows.get(d, {}).items())]})
    states = Counter(v["drift"]["state"] for d in devices for v in d["versions"] if v["drift"])
    return {"buckets_ms": list(BUCKETS_MS), "devices": devices,
            "counts": {s.value: states.get(s.value, 0) for s in State}, "unreadable": unreadable}


def drift_events(store: "FleetStore", device: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The latest drift events, newest first."""
    sql = ("SELECT * FROM events WHERE kind IN (?, ?)" + (" AND device_id = ?" if device is not None else "")
           + " ORDER BY ts DESC LIMIT ?")
    args = (DETECTED, CLEARED, *((device,) if device is not None else ()), limit)
    return [dict(r) for r in store.db.execute(sql, args)]
