"""The fleet's measurements against their predictions, from a real SQLite store with rows put in as a fleet (or
an old store, or a broken device) leaves them: real devices meet their class's prediction, emulated agents this
host's, malformed figures and predictions are skipped and counted, never a crash."""

from __future__ import annotations

import json
import math
import sqlite3
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dashboard import Dashboard, prometheus
from pipeline.fleet import FleetStore
from pipeline.fleet.accuracy import COMPARED, prediction_check, predictions
from pipeline.fleet.store import MIGRATIONS

T0 = 1_700_000_000.0
RPI4 = {"latency_ms": 10.0, "peak_memory_mb": 100.0, "energy_mj": 30.0, "basis": "roofline"}
HOST = {"latency_ms": 2.0, "peak_memory_mb": 50.0, "energy_mj": 60.0, "basis": "host calibrated"}


@pytest.fixture
def store(fleet_db):
    s = FleetStore(fleet_db)
    yield s
    s.close()


def deploy(store, version: int, target: str = "rpi4", predicted: dict | None = None) -> None:
    store.record(name="m", target=target, version=version, sha256="0" * 64, artifact="a", kind="deploy",
                 status="succeeded", reason=None, results=[], predicted=predicted)


def device(store, device_id: str, target: str | None = "rpi4") -> None:
    store.ingest([(device_id, "status", {"state": "activated", "target": target, "active_version": 3, "ts": T0})])


def report(store, device_id: str, version, p50=None, p95=None, rss=None, emulated=False, ts: float | None = None):
    """A metrics row as it lies in the store, bypassing the ingester's cleaning (an old store, a bug)."""
    report.n += 1
    store.db.execute("INSERT INTO metrics (device_id, ts, version, latency_ms_p50, latency_ms_p95, rss_mb, emulated) "
                     "VALUES (?,?,?,?,?,?,?)", (device_id, ts if ts is not None else T0 + report.n, version, p50,
                                                p95, rss, int(emulated)))


report.n = 0


def row(check: dict, target, basis: str, metric: str) -> dict:
    [r] = [c for c in check["classes"] if (c["target"], c["basis"], c["metric"]) == (target, basis, metric)]
    return r


def test_real_devices_meet_their_class_prediction_and_emulated_agents_this_host_s(store):
    deploy(store, 3, predicted=predictions("rpi4", RPI4, HOST))
    for d in ("pi-a", "pi-b", "rpi4-emu-0"):
        device(store, d)
    for p50 in (10.5, 11.0, 30.0):  # a noisy device counts once: its median, 11 ms, is +10%
        report(store, "pi-a", 3, p50=p50, p95=2 * p50, rss=110.0)
    report(store, "pi-b", 3, p50=8.0, p95=12.0, rss=90.0)  # -20%
    # an emulated agent measured this host: 2.2 ms is +10% on the host's 2 ms, never -78% on the rpi4's 10 ms
    report(store, "rpi4-emu-0", 3, p50=2.2, p95=3.0, rss=65.0, emulated=True)
    check = prediction_check(store)
    assert check["error"] == "(measured - predicted) / predicted"

    p50 = row(check, "rpi4", "target", "latency_p50")
    assert (p50["predicted_for"], p50["comparisons"], p50["devices"], p50["versions"], p50["samples"]) == \
        ("rpi4", 2, 2, 1, 4)
    assert p50["median_error"] == pytest.approx((0.1 - 0.2) / 2)
    assert (p50["within_10pct"], p50["within_20pct"]) == (0.5, 1.0)
    assert p50["skipped"] == {"invalid": 0, "unpredicted": 0}
    p95 = row(check, "rpi4", "target", "latency_p95")
    assert p95["median_error"] == pytest.approx(((22 - 10) / 10 + (12 - 10) / 10) / 2)
    assert row(check, "rpi4", "target", "memory_rss")["median_error"] == pytest.approx(0.0)

    host = row(check, "rpi4", "host", "latency_p50")
    assert (host["predicted_for"], host["devices"], host["samples"]) == ("host", 1, 1)
    assert host["median_error"] == pytest.approx(0.1) and host["within_10pct"] == 1.0
    assert row(check, "rpi4", "host", "memory_rss")["median_error"] == pytest.approx(0.3)

    by = {(v["basis"], v["metric"]): v for v in check["versions"]}
    assert by[("target", "latency_p50")]["predicted"] == 10.0
    assert by[("target", "latency_p50")]["prediction_basis"] == "roofline"
    assert by[("target", "latency_p50")]["measured_median"] == pytest.approx((11.0 + 8.0) / 2)
    assert by[("host", "latency_p50")]["predicted"] == 2.0 and by[("host", "latency_p50")]["version"] == 3
    assert by[("host", "latency_p50")]["prediction_basis"] == "host calibrated"


def test_an_emulated_agent_is_never_compared_with_the_target_s_prediction(store):
    deploy(store, 4, predicted=predictions("rpi4", RPI4, None))  # no prediction for this host recorded
    device(store, "rpi4-emu-0")
    report(store, "rpi4-emu-0", 4, p50=2.0, p95=3.0, rss=60.0, emulated=True)
    check = prediction_check(store)
    assert check["versions"] == []
    for c in COMPARED:
        r = row(check, "rpi4", "host", c.name)
        assert r["comparisons"] == 0 and r["median_error"] is None and r["skipped"]["unpredicted"] == 1
    assert not [c for c in check["classes"] if c["basis"] == "target"]


@pytest.mark.parametrize("fleet_db", ["sqlite"], indirect=True)  # text in number columns: SQLite only
def test_malformed_figures_and_predictions_are_skipped_and_counted(store):
    deploy(store, 5, predicted=predictions("rpi4", RPI4, HOST))
    deploy(store, 5, predicted={"target": {"latency_ms": -1.0}})  # a later record with nothing usable hides nothing
    deploy(store, 6)  # deployed before predictions were stored: no comparison
    for version, raw in ((7, "not json"), (8, "[1, 2]"), (9, json.dumps({"target": "fast"})),
                         (10, json.dumps({"target": {"latency_ms": -1, "peak_memory_mb": "big"}})),
                         (11, "[" * 100_000), (12, json.dumps({"target": {"latency_ms": None}})),
                         (13, '{"target": {"latency_ms": 1%s}}' % ("0" * 400))):
        deploy(store, version)
        store.db.execute("UPDATE deployments SET predicted = ? WHERE version = ?", (raw, version))
    device(store, "pi")
    device(store, "nameless", target=None)  # never said its class
    report(store, "pi", 5, p50=10.0, p95=10.0, rss=100.0)
    for bad in (None, 0, -3.0, float("nan"), float("inf"), "fast", b"\x00"):
        report(store, "pi", 5, p50=bad, p95=bad, rss=bad)
    for version in (6, 7, 8, 9, 10, 11, 12, 13, 99):
        report(store, "pi", version, p50=10.0, p95=10.0, rss=100.0)
    report(store, "nameless", 5, p50=10.0, p95=10.0, rss=100.0)
    # the ingester's own path: NaN and the wrong types arrive as unknown
    store.ingest([("pi", "metrics", {"version": 5, "latency_ms_p50": float("nan"), "latency_ms_p95": "x",
                                     "rss_mb": True, "ts": T0 + 500})])

    check = prediction_check(store)
    for c in COMPARED:
        r = row(check, "rpi4", "target", c.name)
        assert (r["comparisons"], r["samples"]) == (1, 1) and r["median_error"] == pytest.approx(0.0), r
        # seven bad values and the ingested report with a missing figure; nine versions without a usable
        # prediction (an old deployment, unreadable, negative or overflowing records, a version never deployed)
        assert r["skipped"] == {"invalid": 8, "unpredicted": 9}, (c.name, r["skipped"])
        assert row(check, None, "target", c.name)["skipped"] == {"invalid": 0, "unpredicted": 1}
    json.dumps(check, allow_nan=False)  # plain JSON: nothing not finite comes out


@pytest.mark.parametrize("fleet_db", ["sqlite"], indirect=True)  # writes SQLite-only values around the store
def test_blobs_in_the_class_and_version_and_extreme_figures_neither_crash_nor_yield_infinity(store):
    """Columns written around the ingester may hold a blob or text where a class or a version goes, and figures so
    far apart that their error overflows: skipped and counted, and the JSON every view renders stays finite."""
    deploy(store, 3, predicted=predictions("rpi4", {**RPI4, "latency_ms": 1e-300}, HOST))
    device(store, "d1")
    device(store, "d2")
    device(store, "d3")
    report(store, "d1", 3, p50=1e300, p95=10.0, rss=90.0)
    report(store, "d2", b"\x00\xff", p50=10.0)
    report(store, "d3", "three", p50=10.0)
    store.db.execute("UPDATE devices SET target = x'00ff' WHERE device_id = 'd3'")
    check = prediction_check(store)
    json.dumps(check, allow_nan=False)  # raises on an infinity or a NaN anywhere in it
    assert row(check, "rpi4", "target", "latency_p50")["skipped"]["invalid"] == 1
    assert row(check, "rpi4", "target", "memory_rss")["comparisons"] == 1
    with Dashboard(store.path, port=0) as dash:
        for path in ("metrics", "api/predictions", "api/overview"):
            with urllib.request.urlopen(dash.url + path, timeout=10) as r:
                assert r.status == 200


def test_an_old_store_migrates_and_its_deployments_show_no_comparison(tmp_path):
    db = tmp_path / "fleet.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE schema_version (v INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) - 1,))
    for sql in MIGRATIONS[:-1]:
        con.execute(sql)
    con.execute("INSERT INTO deployments (ts, name, target, version, sha256, artifact, kind, status) "
                "VALUES (1.0, 'm', 'rpi4', 3, '', 'a', 'deploy', 'succeeded')")
    con.execute("INSERT INTO devices (device_id, target) VALUES ('pi', 'rpi4')")
    con.execute("INSERT INTO metrics (device_id, ts, version, latency_ms_p50, latency_ms_p95, rss_mb, emulated) "
                "VALUES ('pi', 2.0, 3, 9.0, 11.0, 80.0, 0)")
    con.commit()
    con.close()
    s = FleetStore(db)
    try:
        [dep] = s.history()
        assert dep["predicted"] is None
        check = prediction_check(s)
        assert check["versions"] == [] and all(c["comparisons"] == 0 for c in check["classes"])
        assert row(check, "rpi4", "target", "latency_p50")["skipped"] == {"invalid": 0, "unpredicted": 1}
        deploy(s, 4, predicted=predictions("rpi4", RPI4, HOST))  # a new deployment in the migrated store
        assert json.loads(s.history()[0]["predicted"])["target"]["latency_ms"] == 10.0
    finally:
        s.close()


def test_each_device_counts_with_its_latest_reports_only(store):
    deploy(store, 3, predicted=predictions("rpi4", RPI4, HOST))
    device(store, "pi")
    for i, p50 in enumerate((50.0, 50.0, 50.0, 10.0, 12.0)):  # the latest two: 10 and 12, median 11
        report(store, "pi", 3, p50=p50, p95=p50, rss=100.0, ts=T0 + i)
    r = row(prediction_check(store, per_series=2), "rpi4", "target", "latency_p50")
    assert r["samples"] == 2 and r["median_error"] == pytest.approx(0.1)


_VALUES = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**62, 2**62),
                    st.text(max_size=5), st.booleans())
_PREDICTION = st.one_of(st.none(), st.dictionaries(st.sampled_from(["latency_ms", "peak_memory_mb", "basis", "x"]),
                                                   _VALUES, max_size=4))


@pytest.fixture(scope="module", params=["sqlite"])  # writes any value in any column: SQLite only
def scratch(request, tmp_path_factory):
    """One store for every generated example (emptied before each): opening a new one per example is the slow part."""
    s = FleetStore(tmp_path_factory.mktemp("accuracy") / "fleet.db" if request.param == "sqlite"
                   else request.getfixturevalue("postgres").url("accuracy_scratch"))
    yield s
    s.close()


@settings(max_examples=80, deadline=None)
@given(reports=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 3), _VALUES, _VALUES, _VALUES,
                                  st.booleans()), max_size=25),
       deployed=st.lists(st.tuples(st.integers(1, 3), _PREDICTION, _PREDICTION), max_size=4),
       classes=st.lists(st.sampled_from(["rpi4", "jetson", None]), min_size=3, max_size=3))
def test_any_store_contents_give_a_total_consistent_check(scratch, reports, deployed, classes):
    s = scratch
    for table in ("deployments", "devices", "metrics"):
        s.db.execute(f"DELETE FROM {table}")
    for version, target_p, host_p in deployed:
        deploy(s, version, predicted={"target": target_p, "host": host_p})
    for d, target in zip("abc", classes):
        device(s, d, target)
    for i, (d, version, p50, p95, rss, emulated) in enumerate(reports):
        report(s, d, version, p50=p50, p95=p95, rss=rss, emulated=emulated, ts=T0 + i)
    check = prediction_check(s)
    json.dumps(check, allow_nan=False)
    for c in check["classes"]:  # every report is either compared or skipped, once per figure
        sent = sum(1 for d, *_, em in reports if dict(zip("abc", classes))[d] == c["target"]
                   and ("host" if em else "target") == c["basis"])
        assert c["samples"] + sum(c["skipped"].values()) == sent
        if c["comparisons"]:
            assert math.isfinite(c["median_error"]) and 0 <= c["within_10pct"] <= c["within_20pct"] <= 1
    families = list(prometheus.FleetCollector._predictions(check))
    assert [f.name for f in families][0] == "edgefleet_prediction_error_ratio"


def test_the_dashboard_api_and_metrics_show_the_same_check(store):
    from prometheus_client.parser import text_string_to_metric_families

    deploy(store, 3, predicted=predictions("rpi4", RPI4, HOST))
    deploy(store, 3, target="<bad>", predicted=predictions("<bad>", RPI4, HOST))
    device(store, "pi")
    device(store, "odd", target="<bad>")  # a class name no label may carry
    report(store, "pi", 3, p50=11.0, p95=14.0, rss=120.0)
    report(store, "pi", 3, p50=-1.0, p95=14.0, rss=120.0)
    report(store, "odd", 3, p50=11.0, p95=14.0, rss=120.0)
    expected = prediction_check(store)
    with Dashboard(store.path, port=0) as dash:
        with urllib.request.urlopen(dash.url + "api/predictions", timeout=10) as r:
            api = json.loads(r.read())
        with urllib.request.urlopen(dash.url + "metrics", timeout=10) as r:
            body = r.read().decode()
    assert api == json.loads(json.dumps(expected))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}
    labels = (("basis", "target"), ("metric", "latency_p50"), ("target", "rpi4"))
    assert samples[("edgefleet_prediction_error_ratio", labels)] == pytest.approx(0.1)
    assert samples[("edgefleet_prediction_within_tolerance_ratio", (*labels[:2], ("target", "rpi4"),
                                                                     ("tolerance", "0.1")))] == 1.0
    assert samples[("edgefleet_prediction_devices", labels)] == 1
    assert samples[("edgefleet_prediction_samples", labels)] == 1
    assert samples[("edgefleet_prediction_skipped_samples", (*labels[:2], ("reason", "invalid"),
                                                              ("target", "rpi4")))] == 1
    assert samples[("edgefleet_prediction_error_ratio", (("basis", "target"), ("metric", "memory_rss"),
                                                         ("target", "rpi4")))] == pytest.approx(0.2)
    # bounded labels: per class, never per device; a class name that breaks the id rule is no label value
    pairs = {kv for (name, ls) in samples if name.startswith("edgefleet_prediction_") for kv in ls}
    assert {k for k, _ in pairs} == {"target", "basis", "metric", "tolerance", "reason"}
    assert ("target", "<bad>") not in pairs
