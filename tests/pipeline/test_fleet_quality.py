"""The model's behaviour on live traffic as the host keeps it (pipeline.fleet.quality), from values the agent's own
classes made (a real DriftMonitor fed arrays, LiveAccuracy answered and labelled, ShadowStats), encoded as the agent
encodes its metrics and taken through the ingester's path into a real SQLite store: drift events once per
crossing under the thresholds the ingester was given, accuracy and shadow totals that add up over restarts and
ignore repeats and late reports, every view (summary, tables, /metrics) the same figures, and any value a device
sends stored, or left out and counted, never a crash (properties with hypothesis)."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.config import BrokerConfig
from device_agent.drift import (CONFIDENCE_BINS, DriftMonitor, DriftScores, Reference, Thresholds,
                                confidence_bins, events, top1)
from device_agent.protocol import Leaf, Metrics, encode, topic
from device_agent.quality import LiveAccuracy, ShadowStats
from device_agent.serving import BUCKETS_MS, quantile_ms
from pipeline.fleet import FleetStore
from pipeline.fleet.ingest import Drop, Ingester
from pipeline.fleet.quality import Comparison, Skip, drift_events, quality_summary

T0 = 1_700_000_000.0
CLASSES = 4
HISTOGRAM = len(BUCKETS_MS) + 1
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])
_unique = itertools.count()


# -- what the agent sends -------------------------------------------------------------------------------------------
def requests(rng: np.random.Generator, n: int, shift: float = 0.0, bias: float = 0.0):
    """A classifier's traffic: 1x3x4x4 inputs (``shift``: added to every value) and its 4 logits (``bias``: added to
    class 0's, which then wins more often and more confidently)."""
    for _ in range(n):
        logits = rng.normal(0.0, 2.0, (1, CLASSES)).astype(np.float32)
        logits[0, 0] += bias
        yield rng.normal(shift, 1.0, (1, 3, 4, 4)).astype(np.float32), logits


@pytest.fixture(scope="module")
def reference() -> Reference:
    """What the host signs into the manifest, summarised with device_agent.drift's helpers from 4000 requests."""
    xs, outs = zip(*requests(np.random.default_rng(0), 4000))
    x, out = np.concatenate(xs), np.concatenate(outs).astype(np.float64)
    idx, conf = top1(out, "logits")
    classes = np.bincount(idx, minlength=CLASSES) / len(idx)
    bins = np.bincount(confidence_bins(conf, CONFIDENCE_BINS), minlength=CONFIDENCE_BINS) / len(idx)
    return Reference(len(idx), 1, tuple(x.mean(axis=(0, 2, 3)).tolist()), tuple(x.std(axis=(0, 2, 3)).tolist()),
                     "logits", tuple(classes.tolist()), tuple(bins.tolist()))


def watched(reference: Reference, n: int = 400, seed: int = 1, **shifted) -> dict:
    """A DriftMonitor over ``n`` requests, as the agent reports it: ``{"version": 3, **scores}``."""
    monitor = DriftMonitor(reference, window=400)
    for x, y in requests(np.random.default_rng(seed), n, **shifted):
        assert monitor.observe(x, y)
    return {"version": 3, **monitor.scores().to_dict()}


def metrics(device: str, boot: int | None, seq: int | None, version: int = 3, **quality) -> bytes:
    """A metrics message as the agent encodes it (device_agent.protocol.Metrics), with quality values."""
    return encode(Metrics(device, version, 1.0, 2.0, 80.0, 10, True, ts=T0 + 1000 * (boot or 0) + (seq or 0),
                          boot=boot, seq=seq, **quality))


def labelled(answers: list[tuple[int, int, int]], unmatched: int = 0, acc: LiveAccuracy | None = None) -> LiveAccuracy:
    """A LiveAccuracy that answered and was told the label of each (version, top1, label)."""
    acc = acc or LiveAccuracy()
    for version, answer, label in answers:
        rid = f"r{next(_unique)}"
        acc.answered(rid, version, answer)
        assert acc.feedback(rid, label) is not None
    for _ in range(unmatched):
        assert acc.feedback(f"unknown-{next(_unique)}", 0) is None
    return acc


def bucket(ms: float) -> int:
    return next((i for i, bound in enumerate(BUCKETS_MS) if ms <= bound), len(BUCKETS_MS))


def shadowed(stats: ShadowStats, n: int, agree: int, active_ms: float = 0.4, candidate_ms: float = 2.0,
             distance: float = 0.1, dropped: int = 0) -> ShadowStats:
    """``n`` more requests compared, ``agree`` of them agreeing, each taking these latencies."""
    stats.offered += n + dropped
    stats.dropped += dropped
    stats.compared += n
    stats.agree += agree
    stats.sum_distance += n * distance
    stats.max_distance = max(stats.max_distance, distance)
    stats.active_ms[bucket(active_ms)] += n
    stats.candidate_ms[bucket(candidate_ms)] += n
    return stats


def shadow(candidate: int = 4, active: int = 3) -> ShadowStats:
    return ShadowStats(candidate, active, 0.5, active_ms=[0] * HISTOGRAM, candidate_ms=[0] * HISTOGRAM)


# -- the host's side ------------------------------------------------------------------------------------------------
class Fleet:
    """An ingester (never connected: messages are handed to it as the broker would) and its store."""

    def __init__(self, db, **kw) -> None:
        self.ingester = Ingester(BrokerConfig(host="127.0.0.1", port=1), db, **kw)
        self.store = FleetStore(db)

    def send(self, device: str, *payloads: bytes, strict: bool = True) -> None:
        messages = [self.ingester.handle(topic("edgefleet", device, Leaf.METRICS), p) for p in payloads]
        if strict:
            assert None not in messages, self.ingester.dropped_by
        self.ingester._commit(self.store, [m for m in messages if m is not None])
        assert self.ingester.dropped_by[Drop.INTERNAL] == 0 and self.ingester.dropped_by[Drop.STORE] == 0

    def device(self, device: str) -> dict:
        [d] = quality_summary(self.store, device)["devices"]
        return d

    def version(self, device: str, version: int = 3) -> dict:
        [v] = [v for v in self.device(device)["versions"] if v["version"] == version]
        return v


@pytest.fixture
def fleet(fleet_db):
    f = Fleet(fleet_db)
    yield f
    f.store.close()


# -- drift and its events -------------------------------------------------------------------------------------------
def test_drift_raises_one_event_per_crossing_naming_the_scores(fleet, reference):
    quiet, drifted = watched(reference), watched(reference, shift=1.0, bias=6.0)
    fleet.send("d1", metrics("d1", 1, 1, drift=quiet), metrics("d1", 1, 2, drift=quiet))
    drift = fleet.version("d1")["drift"]
    assert (drift["state"], drift["samples"], drift["window"], drift["drifting"]) == ("ok", 400, 400, [])
    assert drift["psi_outputs"] < 0.1 and drift["max_mean_shift"] < 0.1 and drift_events(fleet.store) == []

    fleet.send("d1", metrics("d1", 1, 3, drift=drifted))
    fleet.send("d1", metrics("d1", 1, 4, drift=drifted))  # still drifting: no second event
    expected = events(DriftScores.from_dict(drifted), Thresholds())
    assert {e["score"] for e in expected} == {"psi_outputs", "psi_confidence", "mean_shift"}
    [event] = drift_events(fleet.store)
    assert (event["device_id"], event["kind"], event["version"], event["ts"]) == ("d1", "drift_detected", 3, T0 + 1003)
    assert event["message"].startswith("drift detected on d1 v3: ")
    for e in expected:  # each score with its value and threshold
        assert f"{e['score']} {e['value']:.4g} > {e['threshold']:g}" in event["message"]
    drift = fleet.version("d1")["drift"]
    assert drift["state"] == "drifting" and drift["drifting"] == expected

    # the agent restarts: its window starts again, too few samples for a verdict: no event either way
    fleet.send("d1", metrics("d1", 2, 1, drift=watched(reference, n=50)))
    assert fleet.version("d1")["drift"]["state"] == "collecting" and len(drift_events(fleet.store)) == 1
    fleet.send("d1", metrics("d1", 2, 2, drift=drifted))  # the same drift, seen again: not a new crossing
    assert len(drift_events(fleet.store)) == 1

    fleet.send("d1", metrics("d1", 2, 3, drift=quiet), metrics("d1", 2, 4, drift=quiet))
    cleared, detected = drift_events(fleet.store)
    assert (cleared["kind"], detected["kind"], cleared["version"]) == ("drift_cleared", "drift_detected", 3)
    assert cleared["message"].startswith("drift cleared on d1 v3: psi_outputs ") and "<= 0.25" in cleared["message"]
    assert fleet.ingester.drift_events == 2
    # where events already appear: the store's events (the dashboard's panel, /api/events, each device's page)
    assert [e["kind"] for e in fleet.store.events(device="d1")] == ["drift_cleared", "drift_detected"]


def test_a_late_or_repeated_drift_report_changes_nothing(fleet, reference):
    quiet, drifted = watched(reference), watched(reference, shift=1.0)
    fleet.send("d1", metrics("d1", 1, 5, drift=drifted))
    before = fleet.device("d1")
    fleet.send("d1", metrics("d1", 1, 4, drift=quiet), metrics("d1", 1, 5, drift=drifted))
    assert fleet.device("d1") == before and len(drift_events(fleet.store)) == 1
    # versions are kept apart: the next version's report is its own row, with its own crossing
    fleet.send("d1", metrics("d1", 1, 6, version=4, drift={**drifted, "version": 4}))
    assert [v["version"] for v in fleet.device("d1")["versions"]] == [3, 4]
    assert [e["version"] for e in drift_events(fleet.store)] == [4, 3]


def test_the_ingester_s_thresholds_decide(tmp_path, reference):
    from pipeline.cli.fleet import _thresholds
    from pipeline.config.sections import DriftConfig

    assert _thresholds(None) == Thresholds()  # no deploy.yaml: the defaults
    lenient = _thresholds(SimpleNamespace(drift=DriftConfig(psi_outputs=50, psi_confidence=50, mean_shift=5.0,
                                                            min_samples=100)))
    assert lenient == Thresholds(50.0, 50.0, 5.0, 100)
    f = Fleet(tmp_path / "fleet.db", drift=lenient)
    try:
        f.send("d1", metrics("d1", 1, 1, drift=watched(reference, shift=1.0, bias=6.0)))
        drift = f.version("d1")["drift"]
        assert (drift["state"], drift["thresholds"]) == ("ok", lenient.to_dict()) and drift_events(f.store) == []
        f.send("d1", metrics("d1", 1, 2, drift=watched(reference, shift=6.0)))
        [event] = drift_events(f.store)
        assert "mean_shift" in event["message"] and "> 5 (channel" in event["message"]
    finally:
        f.store.close()


# -- live accuracy ----------------------------------------------------------------------------------------------------
def test_live_accuracy_adds_up_over_restarts_and_late_reports_change_nothing(fleet):
    acc = labelled([(3, i % 2, 0) for i in range(8)], unmatched=2)  # right for the even ones: 4 of 8
    first = copy.deepcopy(acc.snapshot())
    fleet.send("d1", metrics("d1", 1, 1, accuracy=first))
    a = fleet.version("d1")["accuracy"]
    assert (a["labelled"], a["correct"], a["accuracy"]) == (8, 4, 0.5) and fleet.device("d1")["unmatched"] == 2

    labelled([(3, 0, 0), (3, 1, 0)], acc=acc)
    fleet.send("d1", metrics("d1", 1, 2, accuracy=acc.snapshot()), metrics("d1", 1, 1, accuracy=first))
    assert (fleet.version("d1")["accuracy"]["labelled"], fleet.version("d1")["accuracy"]["correct"]) == (10, 5)

    again = labelled([(3, 2, 2), (3, 2, 2)], unmatched=1)  # the agent restarted: its counts start again
    fleet.send("d1", metrics("d1", 2, 1, accuracy=again.snapshot()), metrics("d1", 2, 1, accuracy=again.snapshot()))
    d = fleet.device("d1")
    [v] = d["versions"]
    assert (v["accuracy"]["labelled"], v["accuracy"]["correct"], d["unmatched"]) == (12, 7, 3)
    assert v["accuracy"]["accuracy"] == pytest.approx(7 / 12) and v["drift"] is None and d["window_s"] == 600.0


def test_counts_that_went_down_within_a_boot_add_the_snapshot_whole(fleet):
    """An agent that counts a version again from zero within one boot (LiveAccuracy drops the lowest versions past
    eight; one that counted it before is then counting it anew): the store sees its counters go down and adds the
    new snapshot whole, as it does when a difference is not a count of right answers."""
    def snapshot(labelled: int, correct: int) -> dict:
        return {"versions": {"3": {"labelled": labelled, "correct": correct}}, "unmatched": 0, "window_s": 600.0}

    fleet.send("d1", metrics("d1", 1, 1, accuracy=snapshot(5, 1)))
    fleet.send("d1", metrics("d1", 1, 2, accuracy=snapshot(2, 2)))  # went down: 2 more, 2 right
    a = fleet.version("d1")["accuracy"]
    assert (a["labelled"], a["correct"]) == (7, 3)
    fleet.send("d1", metrics("d1", 1, 3, accuracy=snapshot(3, 3)))  # grew by 1 labelled and 1 right
    fleet.send("d1", metrics("d1", 1, 4, accuracy=snapshot(4, 2)))  # fewer right than before: counted anew
    a = fleet.version("d1")["accuracy"]
    assert (a["labelled"], a["correct"]) == (12, 6) and a["correct"] <= a["labelled"]


# -- shadow ------------------------------------------------------------------------------------------------------------
def test_a_shadow_comparison_adds_up_and_its_percentiles_are_the_agent_s_reading(fleet):
    stats = shadowed(shadow(), 8, agree=7, dropped=2)
    first = copy.deepcopy(stats.to_dict())
    fleet.send("d1", metrics("d1", 1, 1, shadow=first))
    [s] = fleet.device("d1")["shadow"]
    assert (s["candidate"], s["active"], s["sample"], s["top1"]) == (4, 3, 0.5, True)
    assert (s["offered"], s["compared"], s["dropped"], s["errors"], s["agree"]) == (10, 8, 2, 0, 7)
    assert s["agreement"] == 7 / 8 and (s["active_p50_ms"], s["candidate_p50_ms"]) == (0.5, 2.5)

    shadowed(stats, 10, agree=10, candidate_ms=30.0, distance=0.5)
    fleet.send("d1", metrics("d1", 1, 2, shadow=stats.to_dict()), metrics("d1", 1, 1, shadow=first))
    again = shadowed(shadow(), 5, agree=4)  # a restart: shadowing begins again
    fleet.send("d1", metrics("d1", 2, 1, shadow=again.to_dict()))
    [s] = fleet.device("d1")["shadow"]
    assert (s["offered"], s["compared"], s["agree"], s["dropped"]) == (25, 23, 21, 2)
    merged = [a + b for a, b in zip(stats.candidate_ms, again.candidate_ms)]
    assert s["candidate_ms"] == merged and s["candidate_p50_ms"] == quantile_ms(merged, 0.5) == 2.5
    assert s["candidate_p95_ms"] == quantile_ms(merged, 0.95) == 50.0
    assert s["max_distance"] == 0.5
    assert s["mean_distance"] == pytest.approx((8 * 0.1 + 10 * 0.5 + 5 * 0.1) / 23, rel=1e-5)  # means: 6 digits
    assert s["agreement"] == pytest.approx(21 / 23)


def test_a_candidate_without_classes_reports_distances_not_agreement(fleet):
    stats = shadowed(shadow(), 6, agree=0, distance=0.25)
    stats.top1 = False
    fleet.send("d1", metrics("d1", 1, 1, shadow=stats.to_dict()))
    [s] = fleet.device("d1")["shadow"]
    assert (s["top1"], s["agreement"], s["agree"], s["max_distance"]) == (False, None, None, 0.25)


# -- malformed values ----------------------------------------------------------------------------------------------
def good_accuracy() -> dict:
    return labelled([(3, 1, 1), (3, 0, 1)]).snapshot()


def good_shadow() -> dict:
    return shadowed(shadow(), 4, agree=3).to_dict()


def edited(value: dict, **changes) -> dict:
    out = copy.deepcopy(value)
    out.update(changes)
    return out


GOOD_DRIFT = {"version": 3, "window": 400, "requests": 400, "samples": 400, "skipped": 0, "psi_outputs": 0.01,
              "psi_confidence": 0.02, "mean_shift": [0.01, 0.02, 0.0], "max_mean_shift": 0.02}


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("drift", "drifting", Skip.DRIFT),
    ("drift", [GOOD_DRIFT], Skip.DRIFT),
    ("drift", edited(GOOD_DRIFT, samples=-1), Skip.DRIFT),
    ("drift", edited(GOOD_DRIFT, psi_outputs=-0.5), Skip.DRIFT),
    ("drift", edited(GOOD_DRIFT, mean_shift=[]), Skip.DRIFT),
    ("drift", edited(GOOD_DRIFT, entropy=1.0), Skip.DRIFT),  # a key the schema does not know
    ("drift", {k: v for k, v in GOOD_DRIFT.items() if k != "version"}, Skip.VERSION),
    ("drift", edited(GOOD_DRIFT, version="3"), Skip.VERSION),
    ("drift", edited(GOOD_DRIFT, version=2**63), Skip.VERSION),
    ("accuracy", [1], Skip.ACCURACY),
    ("accuracy", edited(good_accuracy(), versions={"3": {"labelled": 1, "correct": 2}}), Skip.ACCURACY),
    ("accuracy", edited(good_accuracy(), versions={"v3": {"labelled": 1, "correct": 1}}), Skip.ACCURACY),
    ("accuracy", edited(good_accuracy(), versions={"\u00b2": {"labelled": 1, "correct": 1}}), Skip.ACCURACY),
    ("accuracy", edited(good_accuracy(), versions={"9" * 19: {"labelled": 1, "correct": 1}}), Skip.ACCURACY),
    ("accuracy", edited(good_accuracy(), unmatched=-1), Skip.ACCURACY),
    ("shadow", 4, Skip.SHADOW),
    ("shadow", edited(good_shadow(), candidate=None), Skip.SHADOW),
    ("shadow", edited(good_shadow(), agree=5), Skip.SHADOW),  # more agreeing than compared
    ("shadow", edited(good_shadow(), active_ms=[0] * 3), Skip.SHADOW),
    ("shadow", edited(good_shadow(), compared=2**52, offered=2**52, mean_distance=1e300), Skip.SHADOW),  # sum: inf
])
def test_each_malformed_value_is_left_out_and_counted(fleet, field, value, reason):
    fleet.send("d1", metrics("d1", 1, 1, **{field: value}))
    assert fleet.ingester.quality_skipped == {reason: 1}
    assert fleet.store.db.execute("SELECT count(*) FROM metrics").fetchone()[0] == 1  # the row itself is stored
    assert all(d["versions"] == [] and d["shadow"] == [] for d in quality_summary(fleet.store)["devices"])
    assert fleet.ingester.counters()["quality_skipped"][reason.value] == 1


def test_counters_without_an_order_are_counted_and_drift_without_one_is_kept(fleet, reference):
    fleet.send("d1", metrics("d1", None, None, accuracy=good_accuracy(), shadow=good_shadow(),
                             drift=watched(reference)))
    assert fleet.ingester.quality_skipped == {Skip.ORDER: 2}
    d = fleet.device("d1")
    assert d["shadow"] == [] and [v["drift"]["state"] for v in d["versions"]] == ["ok"]  # scores need no order


@pytest.mark.parametrize("fleet_db", ["sqlite"], indirect=True)  # writes SQLite-only values around the store
def test_rows_another_writer_left_unreadable_are_counted_and_crash_no_view(fleet, reference):
    from pipeline.dashboard import BudgetBook, FleetView, prometheus

    for device in ("d1", "d2"):
        fleet.send(device, metrics(device, 1, 1, drift=watched(reference), accuracy=good_accuracy(),
                                   shadow=good_shadow()))
    db = fleet.store.db
    db.execute("UPDATE quality_drift SET scores = '{\"window\": \"x\"}' WHERE device_id = 'd1'")
    db.execute("UPDATE quality_accuracy SET correct = 99 WHERE device_id = 'd1'")
    db.execute("UPDATE quality_shadow SET total = x'00ff' WHERE device_id = 'd1'")
    db.execute("INSERT INTO quality_drift VALUES ('d3', 3, 1, 1, 0, '{}', 'sideways', NULL, NULL, 0)")
    summary = quality_summary(fleet.store)
    assert summary["unreadable"] == 4
    d2 = next(d for d in summary["devices"] if d["device_id"] == "d2")
    assert d2["versions"][0]["accuracy"]["labelled"] == 2 and d2["shadow"][0]["compared"] == 4
    body, _ = prometheus.render(FleetView(fleet.store, BudgetBook.from_config(None)))
    assert b'edgefleet_shadow_compared_total{candidate="4",device="d2"} 4.0' in body
    # and the writer goes on over them: the next shadow snapshot of d1 starts its totals afresh
    fleet.send("d1", metrics("d1", 1, 2, shadow=shadowed(shadow(), 1, agree=1).to_dict()))
    assert fleet.device("d1")["shadow"][0]["compared"] == 1


# -- the views: summary, tables, /metrics -------------------------------------------------------------------------
def filled(fleet, reference) -> None:
    fleet.store.ingest([("d1", "status", {"target": "rpi4"}), ("d2", "status", {"target": "rpi4"})])
    fleet.send("d1", metrics("d1", 1, 1, drift=watched(reference, shift=1.0, bias=6.0),
                             accuracy=labelled([(3, 0, 0)] * 9 + [(3, 1, 0)]).snapshot(),
                             shadow=shadowed(shadow(), 40, agree=38).to_dict()))
    fleet.send("d2", metrics("d2", 1, 1, drift=watched(reference, seed=7)))


def test_metrics_carry_drift_accuracy_and_shadow_per_device_and_version(fleet, reference):
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.dashboard import BudgetBook, FleetView, prometheus

    filled(fleet, reference)
    body, _ = prometheus.render(FleetView(fleet.store, BudgetBook.from_config(None)), fleet.ingester.counters())
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    drift = fleet.version("d1")["drift"]
    d1 = (("device", "d1"), ("target", "rpi4"), ("version", "3"))
    for score in ("outputs", "confidence"):
        assert samples[("edgefleet_drift_psi", tuple(sorted((*d1, ("score", score)))))] == drift[f"psi_{score}"]
    assert samples[("edgefleet_drift_mean_shift_max", d1)] == drift["max_mean_shift"]
    assert samples[("edgefleet_drift_drifting", d1)] == 1 and samples[("edgefleet_drift_window_samples", d1)] == 400
    assert samples[("edgefleet_drift_drifting", (("device", "d2"), ("target", "rpi4"), ("version", "3")))] == 0
    assert samples[("edgefleet_live_labelled_total", (("device", "d1"), ("version", "3")))] == 10
    assert samples[("edgefleet_live_correct_total", (("device", "d1"), ("version", "3")))] == 9
    assert samples[("edgefleet_shadow_compared_total", (("candidate", "4"), ("device", "d1")))] == 40
    assert samples[("edgefleet_shadow_agree_total", (("candidate", "4"), ("device", "d1")))] == 38
    assert samples[("edgefleet_ingest_quality_skipped_total", (("reason", "drift"),))] == 0
    assert families["edgefleet_live_labelled"].type == "counter" and families["edgefleet_drift_psi"].type == "gauge"
    assert ("edgefleet_live_labelled_total", (("device", "d2"), ("version", "3"))) not in samples


def test_fleet_drift_and_fleet_status_show_the_one_summary(fleet, reference, tmp_path):
    filled(fleet, reference)
    db = str(fleet.store.path)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", *args, "--db", db], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path, env={**__import__("os").environ, "COLUMNS": "200"})

    as_json = cli("drift", "--json")
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    got = json.loads(as_json.stdout)
    assert {k: v for k, v in got.items() if k != "events"} == json.loads(json.dumps(quality_summary(fleet.store)))
    assert [e["kind"] for e in got["events"]] == ["drift_detected"] and got["counts"]["drifting"] == 1
    [one] = json.loads(cli("drift", "--json", "--device", "d2").stdout)["devices"]
    assert one["device_id"] == "d2"

    table = cli("drift")
    assert table.returncode == 0, table.stderr[-2000:]
    assert "drifting:" in table.stderr and "psi_outputs" in table.stderr
    assert "90.0% of 10" in table.stderr  # d1's live accuracy
    assert "Shadow" in table.stderr and "95.0%" in table.stderr and "Drift events" in table.stderr

    unknown = cli("drift", "--device", "nope")
    assert unknown.returncode != 0 and "no such device" in unknown.stderr and "d2" in unknown.stderr

    status = cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["quality"] == json.loads(
        json.dumps(quality_summary(fleet.store)))
    status = cli("status")
    assert "Quality on live traffic" in status.stderr and "1 device version(s) drifting" in status.stderr


# -- properties, through the ingester's whole path -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bench(request, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("quality") / "fleet.db" if request.param == "sqlite"
              else request.getfixturevalue("postgres").url(f"quality_{next(_unique)}"))
    yield f
    f.store.close()


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
keys = st.sampled_from(["version", "window", "samples", "psi_outputs", "mean_shift", "versions", "3", "labelled",
                        "correct", "unmatched", "candidate", "compared", "agree", "offered", "active_ms", "top1",
                        "mean_distance", "\u00b2", "9" * 19])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=17)
                      | st.dictionaries(st.text(max_size=6) | keys, inner, max_size=5), max_leaves=40)


def mutate(value, edits):
    out = copy.deepcopy(value)
    for key, v in edits:
        stack = [out]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if key in node:
                    node[key] = v
                    break
                stack.extend(node.values())
    return out


def reals() -> dict:
    return {"drift": GOOD_DRIFT, "accuracy": good_accuracy(), "shadow": good_shadow()}


def any_value(field: str):
    return values | st.builds(mutate, st.just(reals()[field]), st.lists(st.tuples(keys, values), max_size=3))


def payload(device: str, boot: int, seq: int, quality: dict) -> bytes:
    body = json.loads(metrics(device, boot, seq))
    body.update(quality)
    return json.dumps(body, allow_nan=True).encode()


@SETTINGS
@given(quality=st.fixed_dictionaries({}, optional={f: any_value(f) for f in ("drift", "accuracy", "shadow")}),
       boot=st.integers(min_value=0, max_value=2), seq=st.integers(min_value=0, max_value=2))
def test_any_quality_value_is_stored_or_counted_and_every_view_answers(bench, quality, boot, seq):
    from pipeline.dashboard import BudgetBook, FleetView, prometheus
    from pipeline.ui import UI
    from pipeline.ui.tables import print_drift, print_quality

    device = f"any-{next(_unique)}"
    before = sum(bench.ingester.quality_skipped.values()) + bench.ingester.dropped
    bench.send(device, payload(device, boot, seq, quality), strict=False)
    summary = quality_summary(bench.store, device)
    assert summary["unreadable"] == 0
    stored = bool(summary["devices"])
    offered = [f for f, v in quality.items() if v is not None]
    if offered and not stored:  # left out: then counted (a NaN anywhere, which the decoder refuses, drops it whole)
        assert sum(bench.ingester.quality_skipped.values()) + bench.ingester.dropped > before
    for d in summary["devices"]:
        for v in d["versions"]:
            a = v["accuracy"]
            assert a is None or 0 <= a["correct"] <= a["labelled"]
            assert v["drift"] is None or v["drift"]["state"] in ("ok", "drifting", "collecting")
        for s in d["shadow"]:
            assert 0 <= s["compared"] + s["errors"] <= s["offered"] and (s["agree"] or 0) <= s["compared"]
    prometheus.render(FleetView(bench.store, BudgetBook.from_config(None)), bench.ingester.counters())
    ui = UI(quiet=True)
    print_quality(ui, summary)
    print_drift(ui, {**summary, "events": drift_events(bench.store, device)})


@st.composite
def shadow_lives(draw):
    """A shadowed candidate's life: boots, each a run of comparisons with a snapshot taken after some of them."""
    boots = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        stats, snapshots = shadow(), []
        for _ in range(draw(st.integers(min_value=1, max_value=5))):
            n = draw(st.integers(min_value=0, max_value=6))
            shadowed(stats, n, agree=draw(st.integers(min_value=0, max_value=n)),
                     candidate_ms=draw(st.sampled_from([0.2, 3.0, 40.0, 9000.0])),
                     dropped=draw(st.integers(min_value=0, max_value=2)))
            snapshots.append(copy.deepcopy(stats.to_dict()))
        boots.append(snapshots)
    return boots


@SETTINGS
@given(life=shadow_lives(), seed=st.integers(min_value=0, max_value=2**32), batch=st.integers(min_value=1, max_value=4))
def test_in_any_order_a_comparison_is_what_each_boot_counted_last(bench, life, seed, batch):
    """However the snapshots arrive (out of order, some twice), the store ends with each boot's last snapshot summed
    over boots."""
    import random

    device = f"life-{next(_unique)}"
    sent = [(boot, seq, snap) for boot, snaps in enumerate(life, start=1) for seq, snap in enumerate(snaps, start=1)]
    rng = random.Random(seed)
    shuffled = sent + rng.sample(sent, k=min(3, len(sent)))
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), batch):
        bench.send(device, *[metrics(device, b, s, shadow=snap) for b, s, snap in shuffled[i:i + batch]])
    expected = Counter()
    for snaps in life:
        for key in Comparison.COUNTERS:
            expected[key] += snaps[-1][key]
    [s] = bench.device(device)["shadow"]
    assert {k: s[k] for k in Comparison.COUNTERS} == {k: expected[k] for k in Comparison.COUNTERS}
    assert s["candidate_ms"] == [sum(x) for x in zip(*(snaps[-1]["candidate_ms"] for snaps in life))]


def test_retention_drops_quality_rows_no_report_updated_within_the_rollups_window(fleet, reference):
    import time

    from pipeline.fleet.retention import RetentionPolicy, apply_retention

    fleet.send("d1", metrics("d1", 1, 1, drift=watched(reference), accuracy=labelled([(3, 0, 0)]).snapshot(),
                             shadow=shadow().to_dict()))
    count = lambda: sum(fleet.store.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: E731
                        for t in ("quality_drift", "quality_accuracy", "quality_accuracy_boots", "quality_shadow"))
    assert count() == 4
    policy = RetentionPolicy(raw_s=86400, bucket_s=300, rollup_s=30 * 86400)
    assert apply_retention(fleet.store, policy, now=time.time() + 86400)["quality_rows_dropped"] == 0
    assert count() == 4
    assert apply_retention(fleet.store, policy, now=time.time() + 31 * 86400)["quality_rows_dropped"] == 4
    assert count() == 0 and quality_summary(fleet.store)["devices"] == []
