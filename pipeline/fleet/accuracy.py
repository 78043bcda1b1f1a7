"""Every deployed model checks its prediction: what the fleet measured of each model version, set against what
was predicted for it, per device class. ``prediction_check(store)`` is the one computation; ``pipeline fleet
status``, the dashboard's panel and ``/metrics`` all show its result.

What is compared with what:

- A deployment records its predictions (``predictions(...)``, stored by ``FleetStore.start``/``record``): for
  the artifact's class (``target``: the signed manifest's ``predicted``) and for this host (``host``: the ``host``
  class's prediction of the same model, where local agents run).
- A metrics report of version V from a device of class C is compared with the latest deployment of V to C that
  has predictions. A real device's report (``emulated: false``) with C's prediction: basis ``target``. An
  emulated agent's (a local stand-in on this host; its figures are this host's) with the host's prediction:
  basis ``host``, never C's.
- ``latency_p50`` and ``latency_p95`` against the predicted ``latency_ms`` (the predictor predicts one typical
  latency: p95's error says how far the tail sits above it); ``memory_rss`` (the agent's RSS with the model
  loaded) against the predicted ``peak_memory_mb``.
- error = (measured - predicted) / predicted: +0.25 is 25% slower (or bigger) than predicted, -0.2 20% faster.
- One comparison per device, version and basis: the median of that device's latest ``per_series`` reports of
  the version (a device reporting every second counts once, like one reporting hourly). A class's median error
  and its shares within ±10% and ±20% are over its comparisons; ``samples`` counts the reports behind them.
- Nothing a device or an old store holds stops it: a report whose value is missing, zero, negative or not finite
  is skipped and counted as ``invalid``; one whose version has no usable prediction (deployed before predictions
  were stored, never deployed from this host, a device that never said its class) as ``unpredicted``.

Raw metrics only (``fleet.retention.raw``, 7 days by default): rollups average p50 and keep the worst p95 and
RSS of a bucket, which would skew the comparison.

The same reports feed the class's refit (``measured_models``, ``pipeline targets calibrate --from-fleet``), and
every calibration of a class is recorded beside them (``record_calibration``, ``latest_calibrations``: the
``calibrations`` table, shown by ``pipeline fleet status``).
"""

from __future__ import annotations

import enum
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from .sql import POSTGRES, SQLITE
from .store import MAX_TEXT, FleetStore

#: the error's definition, as every view states it
ERROR = "(measured - predicted) / predicted"
#: |error| at or under each counts as within it
TOLERANCES = (0.10, 0.20)
#: reports per device, version and basis taken into a comparison (the latest): bounds the work per view
PER_SERIES = 30


@dataclass(frozen=True)
class Compared:
    """One figure a device measures against the prediction it is checked by."""

    name: str  # the ``metric`` label
    measured: str  # column of the metrics table
    predicted: str  # key of a prediction
    unit: str


COMPARED = (Compared("latency_p50", "latency_ms_p50", "latency_ms", "ms"),
            Compared("latency_p95", "latency_ms_p95", "latency_ms", "ms"),
            Compared("memory_rss", "rss_mb", "peak_memory_mb", "MB"))
#: what a prediction keeps: the figures above, energy, and its own ``basis`` text (roofline, calibrated, ...)
PREDICTED_FIGURES = ("latency_ms", "peak_memory_mb", "energy_mj")


class Basis(str, enum.Enum):
    """Which prediction a report is set against."""

    TARGET = "target"  # the device's class's (a real device measured itself)
    HOST = "host"  # this host's (an emulated agent measured this host)


class Skip(str, enum.Enum):
    """Why a report was not compared: the ``reason`` label of ``edgefleet_prediction_skipped_samples``."""

    INVALID = "invalid"  # the measured value is missing, zero, negative or not finite
    UNPREDICTED = "unpredicted"  # no usable prediction for the report's class, version and basis


def positive(v: Any) -> float | None:
    """``v`` as a float when it is a finite number above zero, else None (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:  # an integer of hundreds of digits, as JSON may hold
        return None
    return v if math.isfinite(v) and v > 0 else None


def _prediction(p: Any, name: Any) -> dict[str, Any] | None:
    """A prediction as stored: its figures (finite, positive), its basis text, the class it is for."""
    if not isinstance(p, dict):
        return None
    figures = {k: v for k in PREDICTED_FIGURES if (v := positive(p.get(k))) is not None}
    if not figures:
        return None
    basis = p.get("basis")
    return {**figures, "basis": basis[:MAX_TEXT] if isinstance(basis, str) else None,
            "class": name[:MAX_TEXT] if isinstance(name, str) else None}


def predictions(target: str, manifest_predicted: Any, host_predicted: Any) -> dict[str, Any] | None:
    """What a deployment records: the manifest's prediction for ``target`` and this host's for the same model
    (``pipeline.ota.local_fleet.host_prediction``), each kept only where it has a usable figure."""
    out = {Basis.TARGET.value: _prediction(manifest_predicted, target),
           Basis.HOST.value: _prediction(host_predicted, "host")}
    out = {k: v for k, v in out.items() if v is not None}
    return out or None


def _recorded(store: FleetStore) -> dict[tuple[str, int], dict[str, Any]]:
    """(class, version) -> the latest recorded predictions of that deployment; unreadable records are ignored."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in store.db.execute("SELECT target, version, predicted FROM deployments WHERE predicted IS NOT NULL "
                              "ORDER BY id"):
        try:
            p = json.loads(r["predicted"])
        except (TypeError, ValueError, RecursionError):
            continue
        if not isinstance(p, dict):
            continue
        usable = {b.value: _prediction(v, v.get("class")) if isinstance(v := p.get(b.value), dict) else None
                  for b in Basis}
        if any(usable.values()):  # a later record with nothing usable does not hide an earlier one's figures
            out[(r["target"], r["version"])] = usable
    return out


#: each device's latest ``per_series`` raw reports per version and emulated flag, with the device's class: the
#: series from the index ``metrics_by_series``, then a seek per series (20,000 of 200,000 rows in ~40 ms here).
#: SQLite seeks by rowid, PostgreSQL by a lateral join: the one query the two engines spell apart
_REPORTS = {SQLITE: """
WITH series AS (SELECT DISTINCT device_id, version, emulated FROM metrics WHERE version IS NOT NULL)
SELECT d.target, m.device_id, m.version, m.emulated, m.latency_ms_p50, m.latency_ms_p95, m.rss_mb
FROM series s
JOIN metrics m ON m.rowid IN (SELECT rowid FROM metrics x WHERE x.device_id = s.device_id AND x.version = s.version
                              AND x.emulated IS s.emulated ORDER BY x.ts DESC LIMIT ?)
LEFT JOIN devices d ON d.device_id = m.device_id""", POSTGRES: """
WITH series AS (SELECT DISTINCT device_id, version, emulated FROM metrics WHERE version IS NOT NULL)
SELECT d.target, m.device_id, m.version, m.emulated, m.latency_ms_p50, m.latency_ms_p95, m.rss_mb
FROM series s
JOIN LATERAL (SELECT * FROM metrics x WHERE x.device_id = s.device_id AND x.version = s.version
              AND x.emulated IS NOT DISTINCT FROM s.emulated ORDER BY x.ts DESC LIMIT ?) m ON true
LEFT JOIN devices d ON d.device_id = m.device_id"""}


def _within(errors: list[float]) -> dict[str, float | None]:
    """The share of ``errors`` within each tolerance (None without any)."""
    return {f"within_{round(t * 100)}pct": (sum(abs(e) <= t + 1e-12 for e in errors) / len(errors) if errors else None)
            for t in TOLERANCES}


def predicted_for(target: str | None, basis: str) -> str | None:
    """The class whose prediction a comparison checks: this host's for emulated agents, else the device's class."""
    return "host" if basis == Basis.HOST.value else target


@dataclass
class _Series:
    """One class, version, basis and metric: each device's measured values, and the prediction they meet."""

    predicted: float
    prediction_basis: str | None
    by_device: dict[str, list[float]]

    def medians(self) -> dict[str, float]:
        return {d: statistics.median(v) for d, v in self.by_device.items()}

    def errors(self) -> list[float]:
        return [(m - self.predicted) / self.predicted for m in self.medians().values()]


def prediction_check(store: FleetStore, per_series: int = PER_SERIES) -> dict[str, Any]:
    """The comparison, per class (``classes``: one row per class, basis and metric) and per version
    (``versions``: one row per class, version, basis and metric). See the module's docstring for the rules."""
    recorded = _recorded(store)
    series: dict[tuple, _Series] = {}  # (class, version, basis, metric)
    skipped: dict[tuple, Counter] = defaultdict(Counter)  # (class, basis, metric)
    for r in store.db.execute(_REPORTS[store.engine], (per_series,)):
        # a store written around the ingester may hold anything in any column: an unknown class or version
        target = r["target"] if isinstance(r["target"], str) else None
        version = r["version"] if isinstance(r["version"], int) and not isinstance(r["version"], bool) else None
        basis = (Basis.HOST if r["emulated"] else Basis.TARGET).value
        prediction = (recorded.get((target, version)) if version is not None else None) or {}
        prediction = prediction.get(basis) or {} if isinstance(prediction, dict) else {}
        for c in COMPARED:
            if (predicted := positive(prediction.get(c.predicted))) is None:
                skipped[(target, basis, c.name)][Skip.UNPREDICTED.value] += 1
            elif (measured := positive(r[c.measured])) is None or not math.isfinite((measured - predicted) / predicted):
                skipped[(target, basis, c.name)][Skip.INVALID.value] += 1
            else:
                s = series.setdefault((target, version, basis, c.name),
                                      _Series(predicted, prediction.get("basis"), defaultdict(list)))
                s.by_device[r["device_id"]].append(measured)
    units = {c.name: c.unit for c in COMPARED}
    versions = []
    for (target, version, basis, metric), s in sorted(series.items(), key=lambda kv: _order(*kv[0])):
        errors = s.errors()
        versions.append({"target": target, "version": version, "basis": basis,
                         "predicted_for": predicted_for(target, basis), "metric": metric, "unit": units[metric],
                         "predicted": s.predicted, "prediction_basis": s.prediction_basis,
                         "measured_median": statistics.median(s.medians().values()),
                         "median_error": statistics.median(errors), "devices": len(s.by_device),
                         "samples": sum(map(len, s.by_device.values()))})
    classes = []
    for target, basis, metric in sorted({(t, b, m) for t, _, b, m in series} | set(skipped),
                                        key=lambda k: _order(k[0], 0, *k[1:])):
        mine = [s for (t, _, b, m), s in series.items() if (t, b, m) == (target, basis, metric)]
        errors = [e for s in mine for e in s.errors()]
        classes.append({
            "target": target, "basis": basis, "predicted_for": predicted_for(target, basis), "metric": metric,
            "unit": units[metric], "comparisons": len(errors),
            "devices": len({d for s in mine for d in s.by_device}), "versions": len(mine),
            "samples": sum(len(v) for s in mine for v in s.by_device.values()),
            "median_error": statistics.median(errors) if errors else None, **_within(errors),
            "skipped": {k.value: skipped[(target, basis, metric)][k.value] for k in Skip}})
    return {"error": ERROR, "per_series": per_series, "tolerances": list(TOLERANCES), "classes": classes,
            "versions": versions}


def _order(target: str | None, version: int, basis: str, metric: str) -> tuple:
    """Classes by name (an unknown one last), versions oldest first, ``target`` before ``host``, metrics in
    ``COMPARED``'s order."""
    return (target is None, target or "", version, [b.value for b in Basis].index(basis),
            [c.name for c in COMPARED].index(metric))


def measured_models(store: FleetStore, target: str, per_series: int = PER_SERIES) -> dict[str, Any]:
    """What the fleet measured of the models checked against ``target``'s predictions (``predicted_for``: the
    class's own devices, or for ``host`` the emulated agents on this host), as ``pipeline targets calibrate
    --from-fleet`` refits from it: per deployed class and version, each device's median p50 (of its latest
    ``per_series`` reports, as the check takes them), their median, and the artifact the latest deployment of that
    version stored (``None``: never deployed from this host). ``invalid`` counts reports without a usable p50."""
    by_version: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    invalid = 0
    for r in store.db.execute(_REPORTS[store.engine], (per_series,)):
        cls = r["target"] if isinstance(r["target"], str) else None
        version = r["version"] if isinstance(r["version"], int) and not isinstance(r["version"], bool) else None
        basis = (Basis.HOST if r["emulated"] else Basis.TARGET).value
        if cls is None or version is None or predicted_for(cls, basis) != target:
            continue
        if (p50 := positive(r["latency_ms_p50"])) is None:
            invalid += 1
            continue
        by_version[(cls, version)][r["device_id"]].append(p50)
    models = []
    for (cls, version), per_device in sorted(by_version.items()):
        row = store.db.execute("SELECT artifact FROM deployments WHERE target = ? AND version = ? "
                               "ORDER BY id DESC LIMIT 1", (cls, version)).fetchone()
        medians = {d: statistics.median(v) for d, v in sorted(per_device.items())}
        models.append({"target": cls, "version": version, "artifact": row["artifact"] if row else None,
                       "devices": medians, "measured_ms": statistics.median(medians.values()),
                       "samples": sum(map(len, per_device.values()))})
    return {"target": target, "per_series": per_series, "models": models, "invalid": invalid}


#: a calibration's record: what ``record_calibration`` takes, and JSON columns among them
CALIBRATION_FIELDS = ("target", "version", "date", "basis", "devices", "samples", "wall_s", "fit", "kernels_file")
_CALIBRATION_JSON = ("devices", "samples", "fit")


def record_calibration(store: FleetStore, *, target: str, version: int, date: str, basis: str, devices: list[str],
                       samples: dict[str, Any], wall_s: float | None, fit: dict[str, Any] | None,
                       kernels_file: str | None) -> int:
    """One calibration of a class (``basis``: ``suite``, timed on its devices, or ``from_fleet``, refit with the
    fleet's measured models): who measured it, how many samples (``{"suite": {device: cases timed}, "fleet":
    {"<class> v<version>": reports}}``), its fit's error and where it was written."""
    with store.db.transaction() as db:
        return db.insert(
            "INSERT INTO calibrations (ts, target, version, date, basis, devices, samples, wall_s, fit, kernels_file)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (time.time(), target, version, date, basis, json.dumps(devices), json.dumps(samples), wall_s,
             json.dumps(fit, default=str) if fit else None, kernels_file))


def latest_calibrations(store: FleetStore) -> list[dict[str, Any]]:
    """Each class's latest calibration, by class; a JSON column that cannot be read is None."""
    out = []
    for r in store.db.execute("SELECT c.* FROM calibrations c JOIN (SELECT target, max(id) AS id FROM calibrations "
                              "GROUP BY target) l ON c.id = l.id ORDER BY c.target"):
        row = {k: r[k] for k in ("ts", *CALIBRATION_FIELDS)}
        for k in _CALIBRATION_JSON:
            try:
                row[k] = json.loads(row[k]) if isinstance(row[k], str) else None
            except (ValueError, RecursionError):
                row[k] = None
        out.append(row)
    return out
