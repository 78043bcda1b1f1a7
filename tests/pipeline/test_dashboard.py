"""The dashboard's server, API, /metrics and the store's retention, over a real HTTP socket and SQLite file."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request

import pytest

from pipeline.dashboard import BudgetBook, Dashboard, FleetView
from pipeline.errors import ConfigError
from pipeline.fleet import FleetStore
from pipeline.fleet.retention import RetentionPolicy, apply_retention, parse_duration
from pipeline.fleet.store import MIGRATIONS

T0 = 1_699_999_800.0  # a bucket boundary for 300 s buckets


def metrics(device: str, ts: float, p50: float, p95: float, rss: float = 80.0, energy: float | None = 2.0,
            **kw) -> tuple[str, str, dict]:
    return device, "metrics", {"device_id": device, "version": 3, "latency_ms_p50": p50, "latency_ms_p95": p95,
                               "latency_ms_p99": p95 * 1.2, "rss_mb": rss, "energy_mj": energy,
                               "energy_source": "predicted", "errors": 0, "uptime_s": 10.0, "ts": ts, **kw}


def status(device: str, target: str, **kw) -> tuple[str, str, dict]:
    return device, "status", {"device_id": device, "state": "idle", "target": target, "active_version": 3,
                              "active_slot": "a", "ts": T0, **kw}


@pytest.fixture
def store(tmp_path):
    s = FleetStore(tmp_path / "fleet.db")
    yield s
    s.close()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# -- retention --------------------------------------------------------------------------------------------------
def test_retention_rolls_old_rows_into_buckets_and_keeps_recent_ones_raw(store):
    now = T0 + 10 * 86400
    old = [metrics("d1", T0 + i * 60, p50=1.0 + i, p95=2.0 + i, rss=50.0 + i) for i in range(10)]  # 2 buckets
    recent = [metrics("d1", now - 60 * i, p50=9.0, p95=9.5) for i in range(3)]
    store.ingest(old + recent)
    done = apply_retention(store, RetentionPolicy(raw_s=86400, bucket_s=300, rollup_s=30 * 86400), now=now)
    assert done["raw_rolled_up"] == 10 and done["buckets_added"] == 2
    assert store.count("metrics") == 3 and store.count("metrics_rollup") == 2

    first, second = [dict(r) for r in store.db.execute("SELECT * FROM metrics_rollup ORDER BY ts")]
    assert (first["ts"], first["samples"], first["bucket_s"]) == (T0, 5, 300)
    assert first["latency_ms_p50"] == pytest.approx(3.0)  # mean of 1..5
    assert first["latency_ms_p95"] == 6.0 and first["rss_mb"] == 54.0  # worst of the bucket
    assert (second["ts"], second["samples"], second["latency_ms_p50"]) == (T0 + 300, 5, pytest.approx(8.0))

    series = store.series("d1")
    assert [p["samples"] for p in series] == [5, 5, 1, 1, 1]
    assert [p["ts"] for p in series] == sorted(p["ts"] for p in series)

    # a second pass changes nothing; a late raw row for a rolled-up bucket merges into it
    assert apply_retention(store, RetentionPolicy(86400, 300, 30 * 86400), now=now)["raw_rolled_up"] == 0
    store.ingest([metrics("d1", T0 + 30, p50=3.0, p95=100.0)])
    apply_retention(store, RetentionPolicy(86400, 300, 30 * 86400), now=now)
    merged = dict(store.db.execute("SELECT * FROM metrics_rollup ORDER BY ts").fetchone())
    assert merged["samples"] == 6 and merged["latency_ms_p95"] == 100.0
    assert merged["latency_ms_p50"] == pytest.approx((3.0 * 5 + 3.0) / 6)

    # past the rollup window, rollups and events go
    store.ingest([("d1", "events", {"kind": "activated", "message": "v3", "ts": T0})])
    done = apply_retention(store, RetentionPolicy(86400, 300, 2 * 86400), now=now)
    assert done["rollups_dropped"] == 2 and done["events_dropped"] == 1 and store.count("metrics") == 3


def test_retention_policy_and_durations_are_checked():
    assert parse_duration("7d", "x") == 7 * 86400 and parse_duration("5m", "x") == 300 and parse_duration(30, "x") == 30
    with pytest.raises(ConfigError, match="fleet.retention.raw: expected a duration"):
        parse_duration("a week", "fleet.retention.raw")
    with pytest.raises(ConfigError, match="bucket"):
        RetentionPolicy(raw_s=60, bucket_s=300, rollup_s=600)


def test_an_old_store_is_migrated_in_place_without_losing_rows(tmp_path):
    db = tmp_path / "fleet.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE schema_version (v INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (6)")
    for sql in MIGRATIONS[:6]:
        con.execute(sql)
    con.execute("INSERT INTO metrics (device_id, ts, version, latency_ms_p50) VALUES ('d1', 1.0, 1, 4.0)")
    con.commit()
    con.close()
    s = FleetStore(db)
    try:
        assert s.db.execute("SELECT v FROM schema_version").fetchone()[0] == len(MIGRATIONS)
        [row] = s.series("d1")
        assert row["latency_ms_p50"] == 4.0 and row["errors"] is None
    finally:
        s.close()


# -- views and /metrics -----------------------------------------------------------------------------------------
def served(latencies_ms: list[float], version: int = 3, errors: tuple[str, ...] = ()) -> dict:
    """What an agent's inference API counted (``TrafficStats.snapshot()``) after answering ``latencies_ms``."""
    from device_agent.serving import TrafficStats

    stats = TrafficStats()
    for ms in latencies_ms:
        stats.observe(version, ms)
    for kind in errors:
        stats.error(version if kind != "overloaded" else None, kind)
    return stats.snapshot()


def fill(store) -> None:
    store.ingest([status("fast", "rpi4"), status("slow", "rpi4", job_id="j9", version=4, progress=0.5,
                                                 state="downloading"),
                  metrics("fast", T0 + 1, p50=3.0, p95=4.0, boot=1, seq=1,
                          traffic=served([0.2, 0.7, 3.0, 40.0], errors=("runtime", "overloaded"))),
                  metrics("slow", T0 + 1, p50=60.0, p95=75.0),
                  ("fast", "online", {"online": True, "ts": T0}), ("slow", "online", {"online": False, "ts": T0})])


def test_the_overview_flags_a_device_over_its_class_budget(store):
    fill(store)
    overview = FleetView(store, BudgetBook.from_config(None)).overview(now=T0 + 5)
    by_id = {d["device_id"]: d for d in overview["devices"]}
    assert by_id["fast"]["budget"] == {"status": "ok", "over": []}
    assert by_id["slow"]["budget"] == {"status": "over", "over": ["latency_ms"]}  # rpi4: p95 <= 50 ms
    assert by_id["fast"]["online"] and not by_id["slow"]["online"]
    assert (by_id["slow"]["job_version"], by_id["slow"]["progress"]) == (4, 0.5)
    assert overview["counts"] == {"devices": 2, "online": 1, "over_budget": 1, "updating": 1}
    # the next status without a job clears it
    store.ingest([status("slow", "rpi4", ts=T0 + 2)])
    assert FleetView(store, BudgetBook.from_config(None)).overview()["counts"]["updating"] == 0


def test_metrics_endpoint_speaks_prometheus_in_base_units(store, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    fill(store)
    store.record(name="m", target="rpi4", version=3, sha256="0" * 64, artifact="a", kind="deploy",
                 status="succeeded", reason=None, results=[{"device_id": "fast", "status": "activated"}])
    with Dashboard(store.path, port=0) as dash:
        code, headers, body = get(dash.url + "metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("edgefleet_inference_latency_seconds", (("device", "slow"), ("percentile", "95")))] == 0.075
    assert samples[("edgefleet_device_memory_rss_bytes", (("device", "fast"),))] == 80 * 1024 * 1024
    assert samples[("edgefleet_device_up", (("device", "slow"), ("target", "rpi4")))] == 0
    assert samples[("edgefleet_device_budget_exceeded", (("budget", "latency_ms"), ("device", "slow")))] == 1
    assert samples[("edgefleet_device_budget_exceeded", (("budget", "latency_ms"), ("device", "fast")))] == 0
    assert samples[("edgefleet_target_latency_budget_seconds", (("target", "rpi4"),))] == 0.05
    assert samples[("edgefleet_device_update_progress_ratio", (("device", "slow"),))] == 0.5
    assert samples[("edgefleet_deployments_total", (("status", "succeeded"), ("target", "rpi4")))] == 1
    assert families["edgefleet_deployments"].type == "counter"
    # the inference API's requests: a histogram in seconds with cumulative buckets, per device and class
    assert families["edgefleet_inference_request_duration_seconds"].type == "histogram"
    fast = (("device", "fast"), ("target", "rpi4"))
    bucket = lambda le: samples[("edgefleet_inference_request_duration_seconds_bucket",  # noqa: E731
                                 tuple(sorted((*fast, ("le", le)))))]
    assert (bucket("0.00025"), bucket("0.001"), bucket("0.005"), bucket("0.05"), bucket("+Inf")) == (1, 2, 3, 4, 4)
    assert samples[("edgefleet_inference_request_duration_seconds_count", fast)] == 4
    assert samples[("edgefleet_inference_request_duration_seconds_sum", fast)] == pytest.approx(0.0439)
    assert samples[("edgefleet_inference_requests_total", fast)] == 6  # 4 answered, 2 failed
    assert samples[("edgefleet_inference_errors_total", tuple(sorted((*fast, ("kind", "runtime")))))] == 1
    assert samples[("edgefleet_inference_errors_total", tuple(sorted((*fast, ("kind", "benchmark")))))] == 0
    assert samples[("edgefleet_inference_rejected_total", fast)] == 1
    assert ("edgefleet_inference_requests_total", (("device", "slow"), ("target", "rpi4"))) not in samples
    # no label whose values grow with traffic (basis, metric and tolerance: the prediction check's, per class; kind:
    # the inference API's error kinds and benchmark; le: the histogram's fixed buckets), none per model version
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert labels <= {"device", "target", "percentile", "budget", "status", "source", "reason", "basis", "metric",
                      "tolerance", "kind", "le"}


def test_the_traffic_api_and_fleet_status_show_the_one_summary(store, tmp_path):
    import subprocess
    import sys

    from pipeline.fleet.traffic import traffic_summary

    fill(store)
    with Dashboard(store.path, port=0) as dash:
        code, _, body = get(dash.url + "api/traffic")
    assert code == 200 and json.loads(body) == json.loads(json.dumps(traffic_summary(store)))
    [fast] = json.loads(body)["devices"]
    assert (fast["device_id"], fast["requests"], fast["answered"], fast["p95_ms"], fast["rejected"]) == (
        "fast", 6, 4, 50.0, 1)
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--db", str(store.path),
                             "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["traffic"] == json.loads(body)
    table = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--db", str(store.path)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env={**__import__("os").environ, "COLUMNS": "200"})
    assert "Traffic" in table.stderr and "bench p95 ms" in table.stderr and "1 (runtime 1)" in table.stderr


def test_the_quality_api_is_the_store_s_summary(store):
    from device_agent.drift import DriftScores
    from device_agent.quality import LiveAccuracy
    from pipeline.fleet import quality

    accuracy = LiveAccuracy()
    accuracy.answered("r1", 3, 2)
    accuracy.feedback("r1", 2)
    drift = DriftScores(500, 500, 500, 0, psi_outputs=0.4, psi_confidence=0.1, mean_shift=(0.1,), max_mean_shift=0.1)
    messages = [status("fast", "rpi4"), metrics("fast", T0 + 1, p50=3.0, p95=4.0, boot=1, seq=1,
                                                drift={"version": 3, **drift.to_dict()},
                                                accuracy=accuracy.snapshot())]
    store.ingest(messages)  # what the ingester does with a batch: its rows, then its quality values
    assert quality.ingest(store, messages) == 1  # psi_outputs 0.4 > 0.25: drift_detected
    with Dashboard(store.path, port=0) as dash:
        code, _, body = get(dash.url + "api/quality")
        _, _, events = get(dash.url + "api/events")
    assert code == 200 and json.loads(body) == json.loads(json.dumps(quality.quality_summary(store)))
    [fast] = json.loads(body)["devices"]
    [v3] = fast["versions"]
    assert (fast["target"], v3["drift"]["state"], v3["drift"]["psi_outputs"]) == ("rpi4", "drifting", 0.4)
    assert v3["accuracy"] == {"labelled": 1, "correct": 1, "accuracy": 1.0, "ts": v3["accuracy"]["ts"]}
    assert [e["kind"] for e in json.loads(events)] == ["drift_detected"]


def test_metrics_speak_openmetrics_when_the_scraper_asks(store):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    fill(store)
    with Dashboard(store.path, port=0) as dash:
        code, headers, body = get(dash.url + "metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert code == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["edgefleet_deployments"].type == "counter" and "edgefleet_device_up" in families


def test_ids_that_break_the_protocol_rule_never_become_label_values(store):
    from pipeline.dashboard import prometheus

    # a store written before ids were checked at ingest may hold them; /metrics leaves them out
    bad = ["<script>", "a b", "é", "x" * 70, "-lead"]
    store.ingest([status(d, "rpi4") for d in bad] + [status("fine", "<b>rpi4</b>")])
    body, _ = prometheus.render(FleetView(store, BudgetBook.from_config(None)))
    text = body.decode()
    assert 'device="fine"' in text and 'target=""' in text
    assert not any(f'"{d}"' in text for d in bad) and "<b>" not in text


# -- the HTTP server and its guard ------------------------------------------------------------------------------
def test_loopback_needs_no_token_but_refuses_foreign_host_names(store):
    fill(store)
    with Dashboard(store.path, port=0) as dash:
        code, _, body = get(dash.url + "api/overview")
        assert code == 200 and json.loads(body)["counts"]["devices"] == 2
        assert get(dash.url + "api/overview", {"Host": "attacker.example:8600"})[0] == 403  # DNS rebinding
        assert get(dash.url + "api/devices/nope")[0] == 404
        assert get(dash.url + "api/events?limit=x")[0] == 400
        code, _, body = get(dash.url)
        assert code == 200 and b'src="/static/app.js"' in body and b"//cdn" not in body
        for asset in ("app.js", "chart.js", "style.css"):
            assert get(dash.url + "static/" + asset)[0] == 200
        assert get(dash.url + "static/../server.py")[0] == 404


def test_beyond_loopback_every_request_needs_the_token(store):
    with pytest.raises(ConfigError, match="needs a token"):
        Dashboard(store.path, host="0.0.0.0", port=0)
    with Dashboard(store.path, host="0.0.0.0", port=0, token="s3cret") as dash:
        port = dash.server_address[1]
        base = f"http://127.0.0.1:{port}/"
        assert get(base + "healthz")[0] == 200
        assert get(base + "api/overview")[0] == 401
        assert get(base + "metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(base + "metrics", {"Authorization": "Bearer s3cret"})[0] == 200
        code, headers, _ = get(base + "?token=s3cret&x=1")
        assert code == 303 and headers["Location"] == "/?x=1"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and cookie == "edgefleet_token=s3cret"
        assert get(base + "api/overview", {"Cookie": cookie})[0] == 200
        assert get(base + "api/overview", {"Cookie": "edgefleet_token=nope"})[0] == 401


def test_the_stream_announces_each_commit(store):
    import http.client

    with Dashboard(store.path, port=0, stream_poll_s=0.05) as dash:
        host, port = dash.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/api/stream")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        assert resp.readline() == b"event: change\n"  # the initial state
        resp.readline(), resp.readline()
        fill(store)  # another connection commits
        assert resp.readline() == b"event: change\n"
        conn.close()


def test_the_grafana_dashboard_queries_only_metrics_we_export(store):
    import re

    from conftest import REPO
    from pipeline.dashboard import prometheus

    fill(store)  # and every figure an agent reports, so that each family has samples (and labels) to check
    store.ingest([metrics("fast", T0 + 2, p50=3.0, p95=4.0, throughput_ips=90.0, cpu_percent=50.0,
                          temperature_c=60.0)])
    from pipeline.fleet.accuracy import predictions

    store.record(name="m", target="rpi4", version=3, sha256="0" * 64, artifact="a", kind="deploy",
                 status="succeeded", reason=None, results=[],
                 predicted=predictions("rpi4", {"latency_ms": 3.0, "peak_memory_mb": 90.0}, None))
    body, _ = prometheus.render(FleetView(store, BudgetBook.from_config(None)),
                                {"received": 1, "stored": 1, "up": 1, "dropped": {"json": 1}})
    names = set(re.findall(r"^# TYPE (\w+) \w+", body.decode(), re.M))  # the library names counters _total
    names |= {f"{n}_{part}" for n in re.findall(r"^# TYPE (\w+) histogram", body.decode(), re.M)
              for part in ("bucket", "sum", "count")}  # a histogram is queried by its series
    grafana = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in grafana["panels"] for t in p["targets"]]
    queries += [v["query"] for v in grafana["templating"]["list"] if v["type"] == "query"]
    used = {m for q in queries for m in re.findall(r"\bedgefleet_\w+", q)}
    assert len(grafana["panels"]) >= 10 and used and used <= names, used - names
    # and filters only on labels they carry: {name: label names} from the exposition
    from prometheus_client.parser import text_string_to_metric_families

    carried: dict[str, set[str]] = {}
    for f in text_string_to_metric_families(body.decode()):
        for s in f.samples:
            carried.setdefault(s.name, set()).update(s.labels)
    for q in queries:
        for name, matchers in re.findall(r"\b(edgefleet_\w+)\{([^}]*)\}", q):
            wanted = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert wanted <= carried.get(name, set()), (q, wanted - carried.get(name, set()))


def test_a_running_deployment_shows_each_device_as_it_moves_on(store):
    view = FleetView(store, BudgetBook.from_config(None))
    dep = store.start(name="m", target="rpi4", version=9, sha256="0" * 64, artifact="a", kind="deploy",
                      devices=["d1", "d2", "d3"])
    [row] = view.deployments()
    assert row["status"] == "in_progress" and row["progress"] == {
        "total": 3, "by_status": {"pending": 3}, "done": 0, "succeeded": 0}
    store.progress(dep, "d1", "activated")
    with store.progress_queue(dep) as updates:  # as a rollout reports: from paho's network thread
        updates.put("d2", "downloading")
    [row] = view.deployments()
    assert row["progress"]["done"] == 1 and row["progress"]["by_status"] == {"activated": 1, "downloading": 1,
                                                                               "pending": 1}
    store.finish(dep, status="succeeded", reason=None, rollout={"canaries": ["d1"]},
                 results=[{"device_id": d, "status": "activated", "phase": "canary" if d == "d1" else "rollout",
                           "active_version": 9} for d in ("d1", "d2", "d3")])
    [row] = view.deployments()
    assert row["status"] == "succeeded" and row["progress"]["succeeded"] == 3 and row["rollout"] == {"canaries": ["d1"]}
    assert [d["phase"] for d in row["devices"]] == ["canary", "rollout", "rollout"]


def test_malformed_and_late_telemetry_neither_crashes_nor_rewinds(store):
    # wrong types become unknown instead of breaking the batch or every later view
    written = store.ingest([metrics("d1", T0 + 1, p50=1.0, p95=2.0, rss=[1], latency_ms_p95="big"),
                            ("d1", "status", {"state": 7, "target": "rpi4", "ts": "abc"})])
    assert written == 2
    [d] = FleetView(store, BudgetBook.from_config(None)).overview()["devices"]
    assert d["metrics"]["latency_ms_p95"] is None and d["metrics"]["rss_mb"] is None and d["state"] is None
    # a status said earlier in the device's own order (boot, seq), committed after a later one
    # (shared-subscription ingesters), does not win, whatever its clock says; last_seen is the host's time
    store.ingest([status("d2", "rpi4", state="activated", boot=3, seq=10, ts=T0 - 3600)], now=T0 + 20)
    store.ingest([status("d2", "rpi4", state="downloading", job_id="j1", progress=0.2, boot=3, seq=9, ts=T0 + 5)],
                 now=T0 + 21)
    store.ingest([status("d2", "rpi4", state="installing", job_id="j1", boot=2, seq=99, ts=T0 + 9)], now=T0 + 22)
    [row] = [r for r in store.devices() if r["device_id"] == "d2"]
    assert row["state"] == "activated" and row["job_id"] is None and row["last_seen"] == T0 + 22
    assert (row["boot"], row["seq"]) == (3, 10)
    # a later one applies though its clock went back an hour; one without an order applies in arrival order
    store.ingest([status("d2", "rpi4", state="testing", boot=3, seq=11, ts=T0 - 7200)])
    assert store.devices()[1]["state"] == "testing"
    store.ingest([status("d2", "rpi4", state="idle", ts=0)])
    assert [r for r in store.devices() if r["device_id"] == "d2"][0]["state"] == "idle"
    assert (store.devices()[1]["boot"], store.devices()[1]["seq"]) == (3, 11)  # kept for the device's next ones
    # coming online restarts the order: an agent whose boot counter went back (state reset) is followed
    store.ingest([("d2", "online", {"online": True}), status("d2", "rpi4", state="activated", boot=0, seq=1)])
    assert store.devices()[1]["state"] == "activated"


def test_values_no_column_can_hold_are_stored_as_unknown(store):
    # integers beyond 64 bits, lone surrogates, over-long texts, order fields of the wrong kind
    written = store.ingest([metrics("d1", T0, p50=2**70, p95=-(2**64), boot=-1, seq=2**64),
                            status("d1", "rpi4", state="\ud800x", reason="r" * 100_000, boot=True, seq=1.5)])
    assert written == 2
    [d] = store.devices()
    assert d["metrics"]["latency_ms_p50"] is None and d["metrics"]["latency_ms_p95"] is None
    assert d["state"] == "?x" and len(d["reason"]) == 2048 and d["boot"] is None and d["seq"] is None


def test_rows_another_writer_left_malformed_read_as_unknown_and_crash_no_view(store):
    """The ingester cleans what it writes; a row written around it (text, NaN, a blob in a number column: SQLite
    keeps whatever it is given) reads as unknown, so the overview, a device's series and /metrics still answer."""
    fill(store)
    store.db.execute("UPDATE metrics SET latency_ms_p50 = '', latency_ms_p95 = 'fast', rss_mb = x'00ff', "
                     "energy_mj = 'NaN' WHERE device_id = 'slow'")
    store.db.execute("UPDATE devices SET last_seen = 'yesterday', online = NULL, progress = 'half' "
                     "WHERE device_id = 'slow'")
    view = FleetView(store, BudgetBook.from_config(None))
    [slow] = [d for d in view.overview()["devices"] if d["device_id"] == "slow"]
    assert slow["metrics"]["latency_ms_p50"] is None and slow["metrics"]["rss_mb"] is None
    assert all(p["latency_ms_p95"] is None for p in store.series("slow"))
    with Dashboard(store.path, port=0) as dash:
        code, _, body = get(dash.url + "metrics")
        assert code == 200 and b'edgefleet_device_up{device="slow"' in body
        assert get(dash.url + "api/overview")[0] == 200 and get(dash.url + "api/devices/slow")[0] == 200


def test_processes_opening_a_new_store_together_migrate_it_once(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "fleet.db"
    code = f"from pipeline.fleet import FleetStore; FleetStore(__import__('pathlib').Path({str(db)!r})).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)]
    errors = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    s = FleetStore(db)
    try:
        assert [tuple(r) for r in s.db.execute("SELECT v FROM schema_version")] == [(len(MIGRATIONS),)]
    finally:
        s.close()
