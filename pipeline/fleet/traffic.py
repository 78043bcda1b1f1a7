"""What the devices' applications asked of their models, from the agents' traffic snapshots: the one computation
``pipeline fleet status``, the dashboard's traffic panel and ``/metrics`` all show (``traffic_summary``).

An agent reports ``traffic`` with every metrics message: ``device_agent.serving.TrafficStats.snapshot()``, per
model version a latency histogram over ``BUCKETS_MS`` (the last bucket is +Inf) with its count and sum, errors
by kind, and per agent the rejected requests and the queue's depth and peak. Every counter is cumulative since
the agent started (its ``boot``).

How the store keeps them (``record``, called by ``FleetStore.ingest``):

- One row per (device, boot, version) and one per (device, boot), each the latest in the device's own order
  (``seq``); an older or repeated snapshot changes nothing. The totals of a row grow by what the new snapshot
  adds to the previous one. A counter that went down within a boot (the agent keeps a few versions and drops
  the oldest; a version it takes again starts from zero) adds the new snapshot whole.
- A restart is a new boot: its counters start again in rows of their own, and the device's figures are the sum
  over its boots, so they never go backwards.
- Retention (``fold``, run by ``apply_retention``) sums the boots before a device's latest, once they are older
  than the raw window, into one row per device and version; a snapshot of a folded boot that arrives later is
  ``stale``. Rows not updated within the rollup window go.
- Nothing a device sends stops it: each value that is not what the schema says is left out and counted by
  ``Skip`` reason (the ingester exports the counts).

Figures: ``requests`` is every request the API received, answered or not (= ``answered`` + the errors);
``answered`` is what the histogram counts; the percentiles come from the merged histogram by the agent's own
``quantile_ms`` (the upper bound of the bucket the quantile falls in), so the host and the device agree."""

from __future__ import annotations

import enum
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from device_agent.serving import BUCKETS_MS, ERROR_KINDS, quantile_ms

from .sql import Connection, upsert

if TYPE_CHECKING:
    from .store import FleetStore

#: a counter at or above this is refused: what a float holds exactly (Prometheus samples are floats)
MAX_COUNT = 2**53
#: a latency sum (ms) at or above this is refused (some 30 million years)
MAX_SUM_MS = 1e18
#: versions one snapshot may carry (the agent keeps 4); more are skipped
MAX_VERSIONS = 16
#: the version key of requests no model answered (none was active): the agent's str(None)
NO_VERSION = -1
QUANTILES = (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99))
_VERSION_KEY = re.compile(r"[0-9]{1,19}")


class Skip(str, enum.Enum):
    """Why a traffic value was left out: the ``reason`` label of ``edgefleet_ingest_traffic_skipped_total``."""

    SHAPE = "shape"  # the snapshot, its versions or a version's entry is not an object; too many versions
    BUCKETS = "buckets"  # bounds other than BUCKETS_MS, or a histogram with another number of buckets
    COUNT = "count"  # a counter that is not a whole number in [0, 2**53), a sum that is not finite and >= 0,
    #                  or a count that is not the sum of its buckets
    VERSION = "version"  # a version key that is neither a version nor "None"
    KIND = "kind"  # an error kind the protocol does not know (device_agent.serving.ERROR_KINDS)
    ORDER = "order"  # the message has no (boot, seq): its counters cannot be told from a restart's
    STALE = "stale"  # said before what is stored: a snapshot of a boot retention has already folded


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_COUNT else None


@dataclass(frozen=True)
class Counts:
    """One version's histogram (len(BUCKETS_MS) + 1 buckets, +Inf last), its count and sum, errors by kind."""

    buckets: tuple[int, ...] = (0,) * (len(BUCKETS_MS) + 1)
    count: int = 0
    sum_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "Counts") -> "Counts":
        kinds = self.errors.keys() | other.errors.keys()
        return Counts(tuple(a + b for a, b in zip(self.buckets, other.buckets)), self.count + other.count,
                      self.sum_ms + other.sum_ms,
                      {k: self.errors.get(k, 0) + other.errors.get(k, 0) for k in sorted(kinds)})

    def since(self, before: "Counts") -> "Counts":
        """What this snapshot added to ``before``; all of it when a counter went down (they started again)."""
        went_down = (self.count < before.count or self.sum_ms < before.sum_ms
                     or any(a < b for a, b in zip(self.buckets, before.buckets))
                     or any(self.errors.get(k, 0) < n for k, n in before.errors.items()))
        if went_down:
            return self
        return Counts(tuple(a - b for a, b in zip(self.buckets, before.buckets)), self.count - before.count,
                      self.sum_ms - before.sum_ms,
                      {k: n - before.errors.get(k, 0) for k, n in self.errors.items()})

    def to_json(self) -> str:
        return json.dumps({"buckets": list(self.buckets), "count": self.count, "sum_ms": self.sum_ms,
                           "errors": self.errors})

    @classmethod
    def read(cls, entry: Any, skipped: Counter) -> "Counts | None":
        """A version's entry as the agent sends it (and the store keeps it), or None (counted in ``skipped``).
        A bad error count or kind leaves out that value only; a bad histogram, count or sum the whole entry."""
        if not isinstance(entry, dict):
            skipped[Skip.SHAPE] += 1
            return None
        buckets = entry.get("buckets")
        if not isinstance(buckets, list) or len(buckets) != len(BUCKETS_MS) + 1:
            skipped[Skip.BUCKETS if isinstance(buckets, list) else Skip.SHAPE] += 1
            return None
        counted = [_count(b) for b in buckets]
        count, sum_ms = _count(entry.get("count")), entry.get("sum_ms")
        finite = (isinstance(sum_ms, (int, float)) and not isinstance(sum_ms, bool)
                  and math.isfinite(sum_ms) and 0 <= sum_ms < MAX_SUM_MS)
        if None in counted or count is None or count != sum(counted) or not finite:
            skipped[Skip.COUNT] += 1
            return None
        errors: dict[str, int] = {}
        raw = entry.get("errors", {})
        if not isinstance(raw, dict):
            skipped[Skip.SHAPE] += 1
            raw = {}
        for kind, n in raw.items():
            if kind not in ERROR_KINDS:
                skipped[Skip.KIND] += 1
            elif _count(n) is None:
                skipped[Skip.COUNT] += 1
            else:
                errors[kind] = n
        return cls(tuple(counted), count, float(sum_ms), dict(sorted(errors.items())))

    @classmethod
    def load(cls, text: Any) -> "Counts | None":
        """A row's JSON, read back as it was checked on the way in (a row written around the store: None)."""
        try:
            return cls.read(json.loads(text), Counter()) if isinstance(text, str) else None
        except (ValueError, RecursionError):
            return None


@dataclass(frozen=True)
class Snapshot:
    """``TrafficStats.snapshot()`` as checked: counts per version (NO_VERSION: no model), the agent's own figures
    (None where the value was missing or refused)."""

    versions: dict[int, Counts]
    rejected: int | None
    queue_depth: int | None
    queue_peak: int | None


def read_snapshot(value: Any, skipped: Counter) -> Snapshot | None:
    """The ``traffic`` of a metrics message, or None when nothing of it is usable. Total: any JSON value gives a
    snapshot or None, and each value left out is counted in ``skipped`` by ``Skip``."""
    if not isinstance(value, dict):
        skipped[Skip.SHAPE] += 1
        return None
    bounds = value.get("buckets_ms")
    if not isinstance(bounds, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                               for b in bounds):
        skipped[Skip.SHAPE] += 1
        return None
    if [float(b) for b in bounds] != list(BUCKETS_MS):  # histograms over other bounds do not add up
        skipped[Skip.BUCKETS] += 1
        return None
    raw = value.get("versions")
    if not isinstance(raw, dict):
        skipped[Skip.SHAPE] += 1
        raw = {}
    versions: dict[int, Counts] = {}
    for i, (key, entry) in enumerate(raw.items()):
        if i >= MAX_VERSIONS:
            skipped[Skip.SHAPE] += len(raw) - MAX_VERSIONS
            break
        if key == "None":
            version = NO_VERSION
        elif isinstance(key, str) and _VERSION_KEY.fullmatch(key) and int(key) < 2**63:
            version = int(key)
        else:
            skipped[Skip.VERSION] += 1
            continue
        counts = Counts.read(entry, skipped)
        if counts is not None:
            versions[version] = counts
    agent: dict[str, int | None] = {}
    for name in ("rejected", "queue_depth", "queue_peak"):
        agent[name] = _count(value.get(name))
        if name in value and agent[name] is None:
            skipped[Skip.COUNT] += 1
    return Snapshot(versions, **agent)


# --------------------------------------------------------------------------- the store's side

def record(db: Connection, device: str, boot: int | None, seq: int | None, now: float, value: Any,
           skipped: Counter) -> bool:
    """Store one metrics message's ``traffic`` (inside the caller's transaction): False when it was skipped
    (counted in ``skipped``) or is older than what the store holds."""
    snapshot = read_snapshot(value, skipped)
    if snapshot is None:
        return False
    if boot is None or seq is None:
        skipped[Skip.ORDER] += 1
        return False
    folded = db.execute("SELECT boot FROM traffic_boots WHERE device_id = ? AND folded = 1", (device,)).fetchone()
    if folded is not None and isinstance(folded[0], int) and boot <= folded[0]:
        skipped[Skip.STALE] += 1
        return False
    row = db.execute("SELECT seq, rejected, queue_peak FROM traffic_boots WHERE device_id = ? AND boot = ?",
                     (device, boot)).fetchone()
    if row is not None and isinstance(row[0], int) and seq <= row[0]:
        return False  # a redelivery, or a snapshot the stored one already holds
    old_rejected, old_peak = ((_count(row[1]), _count(row[2])) if row is not None else (None, None))
    db.execute(_BOOT_ROW,
               (device, boot, seq, now, _highest(old_rejected, snapshot.rejected), snapshot.queue_depth,
                _highest(old_peak, snapshot.queue_peak), 0))
    for version, counts in snapshot.versions.items():
        stored = db.execute("SELECT total, last FROM traffic WHERE device_id = ? AND boot = ? AND version = ?",
                            (device, boot, version)).fetchone()
        total, last = (Counts.load(stored[0]), Counts.load(stored[1])) if stored is not None else (None, None)
        grown = (total or Counts()) + (counts.since(last) if last is not None else counts)
        db.execute(_VERSION_ROW,
                   (device, boot, version, now, grown.to_json(), counts.to_json()))
    return True


_BOOT_ROW = upsert("traffic_boots", ("device_id", "boot", "seq", "ts", "rejected", "queue_depth", "queue_peak", "folded"),
                   ("device_id", "boot"))
_VERSION_ROW = upsert("traffic", ("device_id", "boot", "version", "ts", "total", "last"), ("device_id", "boot", "version"))


def _highest(a: int | None, b: int | None) -> int | None:
    return max(a, b) if a is not None and b is not None else (b if a is None else a)


def fold(db: Connection, before: float, forget_before: float) -> dict[str, int]:
    """Retention, inside the caller's transaction: each device's boots before its latest whose last snapshot is
    older than ``before`` are summed into its folded row (one per device and version, at the highest boot
    folded); rows not updated since ``forget_before`` are deleted."""
    folded = 0
    boots: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
    for r in db.execute("SELECT device_id, boot, ts, folded FROM traffic_boots"):
        if isinstance(r[1], int) and isinstance(r[2], (int, float)):
            boots[r[0]].append((r[1], float(r[2]), bool(r[3])))
    for device, rows in boots.items():
        live = [b for b, _, f in rows if not f]
        old = [(b, ts) for b, ts, f in rows if not f and ts < before and b != max(live)]
        if not old:
            continue
        into = [(b, ts) for b, ts, f in rows if f] + old
        upto, ts = max(b for b, _ in into), max(t for _, t in into)
        marks = ",".join("?" * len(into))
        rejected = sum(_count(r[0]) or 0 for r in db.execute(
            f"SELECT rejected FROM traffic_boots WHERE device_id = ? AND boot IN ({marks})",
            (device, *(b for b, _ in into))))
        totals: dict[int, tuple[Counts, float]] = {}
        for r in db.execute(f"SELECT version, total, ts FROM traffic WHERE device_id = ? AND boot IN ({marks})",
                            (device, *(b for b, _ in into))):
            counts = Counts.load(r[1])
            if counts is not None and isinstance(r[0], int):
                prev, prev_ts = totals.get(r[0], (Counts(), 0.0))
                totals[r[0]] = (prev + counts, max(prev_ts, float(r[2] or 0)))
        for table in ("traffic", "traffic_boots"):
            db.execute(f"DELETE FROM {table} WHERE device_id = ? AND boot IN ({marks})",
                       (device, *(b for b, _ in into)))
        db.execute("INSERT INTO traffic_boots (device_id, boot, seq, ts, rejected, queue_depth, queue_peak, folded) "
                   "VALUES (?,?,0,?,?,NULL,NULL,1)", (device, upto, ts, rejected))
        db.executemany("INSERT INTO traffic (device_id, boot, version, ts, total, last) VALUES (?,?,?,?,?,NULL)",
                       [(device, upto, v, t, c.to_json()) for v, (c, t) in totals.items()])
        folded += len(old)
    forgotten = db.execute("DELETE FROM traffic WHERE ts < ?", (forget_before,)).rowcount
    db.execute("DELETE FROM traffic_boots WHERE ts < ?", (forget_before,))
    return {"traffic_boots_folded": folded, "traffic_rows_dropped": int(forgotten)}


# --------------------------------------------------------------------------- the views' side

def figures(c: Counts) -> dict[str, Any]:
    """What every view shows of a set of counts."""
    errors = {k: n for k, n in c.errors.items() if n}
    return {"requests": c.count + sum(errors.values()), "answered": c.count, "errors": errors,
            "errors_total": sum(errors.values()),
            **{name: quantile_ms(list(c.buckets), q) for name, q in QUANTILES},
            "mean_ms": c.sum_ms / c.count if c.count else None, "sum_ms": c.sum_ms, "buckets": list(c.buckets)}


def _version(v: int) -> int | None:
    return None if v == NO_VERSION else v


def traffic_summary(store: "FleetStore") -> dict[str, Any]:
    """Per device (summed over its boots and versions, with each version's row) and per class and version
    (summed over its devices). Rows another writer left unreadable are counted in ``unreadable``, never raised."""
    targets = {r[0]: r[1] if isinstance(r[1], str) else None
               for r in store.db.execute("SELECT device_id, target FROM devices")}
    unreadable = 0
    agent: dict[str, dict[str, Any]] = defaultdict(lambda: {"rejected": 0, "latest": None})
    for r in store.db.execute("SELECT device_id, boot, ts, rejected, queue_depth, queue_peak, folded "
                              "FROM traffic_boots ORDER BY device_id, boot"):
        if not isinstance(r[0], str) or not isinstance(r[1], int):
            unreadable += 1
            continue
        a = agent[r[0]]
        a["rejected"] += _count(r[3]) or 0
        if not r[6]:
            a["latest"] = {"boot": r[1], "queue_depth": _count(r[4]), "queue_peak": _count(r[5])}
    by_device: dict[str, dict[int, Counts]] = defaultdict(lambda: defaultdict(Counts))
    seen: dict[tuple[str, int], float] = {}
    for r in store.db.execute("SELECT device_id, version, ts, total FROM traffic"):
        counts = Counts.load(r[3])
        if counts is None or not isinstance(r[0], str) or not isinstance(r[1], int):
            unreadable += 1
            continue
        by_device[r[0]][r[1]] += counts
        ts = float(r[2]) if isinstance(r[2], (int, float)) and math.isfinite(r[2]) else 0.0
        seen[(r[0], r[1])] = max(seen.get((r[0], r[1]), 0.0), ts)
    devices = []
    for device in sorted(by_device.keys() | agent.keys()):
        mine = sorted(by_device.get(device, {}).items(), key=lambda vc: (vc[0] == NO_VERSION, vc[0]))
        total = sum((c for _, c in mine), Counts())
        a = agent.get(device) or {"rejected": 0, "latest": None}
        latest = a["latest"] or {}
        devices.append({
            "device_id": device, "target": targets.get(device), **figures(total), "rejected": a["rejected"],
            "queue_depth": latest.get("queue_depth"), "queue_peak": latest.get("queue_peak"),
            "boot": latest.get("boot"),
            "last_ts": max((seen[(device, v)] for v, _ in mine), default=None),
            "versions": [{"version": _version(v), **figures(c), "last_ts": seen[(device, v)]} for v, c in mine]})
    classes: dict[tuple[str | None, int], tuple[Counts, set[str]]] = {}
    for device, versions in by_device.items():
        for version, counts in versions.items():
            key = (targets.get(device), version)
            c, members = classes.get(key, (Counts(), set()))
            members.add(device)
            classes[key] = (c + counts, members)
    return {"buckets_ms": list(BUCKETS_MS), "devices": devices,
            "classes": [{"target": t, "version": _version(v), "devices": len(members), **figures(c)}
                        for (t, v), (c, members) in sorted(classes.items(),
                                                           key=lambda kv: (kv[0][0] is None, kv[0][0] or "",
                                                                           kv[0][1] == NO_VERSION, kv[0][1]))],
            "unreadable": unreadable}
