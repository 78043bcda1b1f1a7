"""The dashboard in a real headless Chromium, fed by real agents through a real Mosquitto: a deploy shows up
live, the numbers on the page are the store's, and the agents going offline shows without a reload."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import yaml

from conftest import OUTPUT, small_deploy_config
from device_agent.client import Client
from pipeline.fleet import FleetStore
from pipeline.ota import LocalFleet

pytestmark = pytest.mark.slow
DEVICES = ["rpi4-emu-0", "rpi4-emu-1"]
REQUESTS = [7, 12]  # each device's application calls its model this often


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)  # a poll interval: the wait ends on the condition, not on the time
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def series(db, device: str) -> list[dict]:
    s = FleetStore(db, readonly=True)
    try:
        return s.series(device)
    finally:
        s.close()


def latest(db, device: str) -> dict:
    return series(db, device)[-1]


def test_the_dashboard_shows_a_live_fleet_as_the_store_has_it(mosquitto, key_dir, chromium, tmp_path):
    cfg = small_deploy_config(tmp_path, broker={"host": "127.0.0.1", "port": mosquitto.port}, devices=DEVICES)
    data = yaml.safe_load(cfg.read_text())
    data["signing"] = {"key_dir": str(key_dir)}
    cfg.write_text(yaml.safe_dump(data))
    db = tmp_path / ".edgefleet" / "fleet.db"

    dash = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "dashboard", "--config", str(cfg), "--port", "0",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        started = json.loads(dash.stdout.readline())
        url = started["url"]
        assert started["ingest"] == f"127.0.0.1:{mosquitto.port}" and started["token"] is None
        page = chromium.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url)
        page.wait_for_selector("[data-testid=live]:text('live')", timeout=15_000)

        with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 2, key_dir / "signing.pub", "edgefleet",
                        metrics_interval_s=1.0) as fleet:
            assert fleet.device_ids == DEVICES
            # the devices appear, online, before any model reached them (live: no reload)
            for d in DEVICES:
                page.wait_for_selector(f"[data-testid=online-{d}] :text('online')", timeout=20_000)
            deploy = subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", "--target", "rpi4", "--config",
                                     str(cfg), "--report", str(tmp_path / "report.json")],
                                    capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert deploy.returncode == 0, deploy.stderr[-3000:]
            version = json.loads((tmp_path / "report.json").read_text())["artifact"]["version"]
            for d in DEVICES:  # a few periodic reports after the activation
                wait_for(lambda d=d: sum(p["version"] == version for p in series(db, d)) >= 3, 30,
                         f"metrics of v{version} from {d}")
                page.wait_for_selector(f"[data-testid=version-{d}][data-value='{version}']", timeout=15_000)
            # the devices' applications call the model: the traffic panel counts them, live
            for d, n in zip(DEVICES, REQUESTS):
                with Client(str(fleet.socket_path(d)), timeout=30) as client:
                    spec = client.model()["inputs"][0]
                    x = np.zeros([1 if not isinstance(k, int) else k for k in spec["shape"]], spec["dtype"])
                    for _ in range(n):
                        assert client.infer({spec["name"]: x}).version == version
                page.wait_for_selector(f"[data-testid=traffic-answered-{d}][data-value='{n}']", timeout=20_000)
        # the agents stopped: their last will reaches the page through the broker, the ingester and the stream
        for d in DEVICES:
            page.wait_for_selector(f"[data-testid=online-{d}] :text('offline')", timeout=20_000)
        for d in DEVICES:  # the page has caught up with the store: its last redraw shows the latest report
            wait_for(lambda d=d: float(page.locator(f"[data-testid=p95-{d}]").get_attribute("data-value") or "nan")
                     == pytest.approx(latest(db, d)["latency_ms_p95"], rel=1e-9), 15, f"{d}'s latest report on the page")

        # per-device charts with the class's budget lines: targets/rpi4.yaml with deploy.yaml's overrides
        from pipeline.config import load_deploy
        from pipeline.targets import target_for_deploy

        budgets = target_for_deploy(load_deploy(cfg), "rpi4").budgets
        for d in DEVICES:  # what the page shows is what the store holds
            m = latest(db, d)
            for key, testid, digits in (("latency_ms_p95", "p95", 2), ("rss_mb", "rss", 1), ("energy_mj", "energy", 3)):
                cell = page.locator(f"[data-testid={testid}-{d}]")
                assert float(cell.get_attribute("data-value")) == pytest.approx(m[key], rel=1e-9), (d, key)
                assert cell.inner_text().startswith(f"{m[key]:.{digits}f}"), (d, key, cell.inner_text())
            over = [name for name, key in (("latency_ms", "latency_ms_p95"), ("peak_memory_mb", "rss_mb"),
                                           ("energy_mj", "energy_mj")) if m[key] > getattr(budgets, name)]
            assert page.locator(f"[data-testid=budget-{d}]").inner_text() == ("over: " + ", ".join(over) if over else "ok")
        assert page.locator("[data-testid=count-devices]").inner_text() == "2"

        # the traffic panel shows what /api/traffic says (the fleet store's traffic_summary), cell by cell
        traffic = {t["device_id"]: t for t in json.loads(urllib.request.urlopen(url + "api/traffic", timeout=10).read())
                   ["devices"]}
        for d, n in zip(DEVICES, REQUESTS):
            t = traffic[d]
            assert (t["answered"], t["requests"], t["errors_total"]) == (n, n, 0), t
            for key, field, digits in (("requests", "requests", None), ("answered", "answered", None),
                                       ("p50", "p50_ms", 2), ("p95", "p95_ms", 2), ("p99", "p99_ms", 2),
                                       ("errors", "errors_total", None), ("rejected", "rejected", None),
                                       ("queue-peak", "queue_peak", None)):
                cell = page.locator(f"[data-testid=traffic-{key}-{d}]")
                assert float(cell.get_attribute("data-value")) == t[field], (d, key)
                expected = f"{t[field]:.{digits}f}" if digits else str(t[field])
                assert cell.inner_text() == expected, (d, key, cell.inner_text())
        assert page.locator("[data-testid=count-online]").inner_text() == "0"

        # per-device charts
        page.locator(f"tr[data-device={DEVICES[1]}]").click()
        page.wait_for_selector(f"[data-testid=device-name]:text('{DEVICES[1]}')")
        points = series(db, DEVICES[1])
        latency = page.locator("[data-testid=chart-latency]")
        assert int(latency.get_attribute("data-points")) == 3 * len(points)  # p50, p95 and p99 of every report
        assert float(latency.locator("[data-testid=budget-line]").get_attribute("data-value")) == budgets.latency_ms
        p95_path = latency.locator("path[data-series=p95]")
        assert float(p95_path.get_attribute("data-last")) == pytest.approx(points[-1]["latency_ms_p95"])
        memory = page.locator("[data-testid=chart-memory]")
        assert float(memory.locator("[data-testid=budget-line]").get_attribute("data-value")) == budgets.peak_memory_mb

        # the deployment and its rollout, and the agents' events
        deployments = page.locator("[data-testid=deployments] tbody tr")
        assert deployments.count() == 1
        row = deployments.first.inner_text()
        assert f"v{version}" in row and "succeeded" in row and "2/2" in row and "canary" in row
        events = page.locator("[data-testid=events] tbody").inner_text()
        assert events.count("activated") >= 2 and all(d in events for d in DEVICES)

        OUTPUT.mkdir(parents=True, exist_ok=True)
        for where in (tmp_path / "dashboard.png", OUTPUT / "dashboard.png"):
            page.screenshot(path=str(where), full_page=True)
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000

        # Prometheus sees the same fleet
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        for d in DEVICES:
            assert samples[("edgefleet_device_model_version", (("device", d),))] == version
            assert samples[("edgefleet_inference_latency_seconds", (("device", d), ("percentile", "95")))] == \
                pytest.approx(latest(db, d)["latency_ms_p95"] / 1000)
        assert samples[("edgefleet_ingest_messages_total", ())] > 0
    finally:
        dash.terminate()
        try:
            dash.wait(15)
        except subprocess.TimeoutExpired:
            dash.kill()


def test_the_quality_panel_draws_what_a_device_reported(mosquitto, chromium, tmp_path):
    """Drift scores from a real DriftMonitor fed shifted arrays, live accuracy and a shadow comparison, encoded as an
    agent encodes its metrics, published on a real Mosquitto, ingested beside the dashboard and drawn by Chromium:
    the quality panel's cells are what /api/quality says, and the drift event is among the events, live."""
    from fleet_probe import until, wait_subscribed

    from device_agent.drift import DriftMonitor, Reference
    from device_agent.mqtt import MqttLink
    from device_agent.protocol import Leaf, Metrics, Status, encode, topic
    from device_agent.quality import LiveAccuracy, ShadowStats
    from device_agent.serving import BUCKETS_MS
    from pipeline.dashboard import Dashboard
    from pipeline.fleet.ingest import Ingester

    device = "cam-1"
    reference = Reference(1000, 1, (0.0,), (1.0,), "probabilities", (0.5, 0.5), (0.1,) * 10)
    monitor = DriftMonitor(reference, window=400)
    for _ in range(300):  # every input three reference std above the mean, every answer class 0 at 0.9
        assert monitor.observe(np.full((1, 1, 4), 3.0, np.float32), np.array([[0.9, 0.1]], np.float32))
    accuracy = LiveAccuracy()
    for i, label in enumerate((0, 0, 1)):
        accuracy.answered(f"r{i}", 3, 0)
        accuracy.feedback(f"r{i}", label)
    hist = [0] * (len(BUCKETS_MS) + 1)
    shadow = ShadowStats(4, 3, 0.2, offered=10, compared=10, agree=9, sum_distance=0.5, max_distance=0.2,
                         active_ms=[*hist[:2], 10, *hist[3:]], candidate_ms=[*hist[:4], 10, *hist[5:]])
    db = tmp_path / "fleet.db"
    ingester = Ingester(mosquitto.config, db, flush_s=0.05)
    with Dashboard(db, port=0, ingester=ingester) as dash:
        page = chromium.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(dash.url)
        page.wait_for_selector("[data-testid=live]:text('live')", timeout=15_000)
        pub = MqttLink(mosquitto.config, "devices", lambda t, p: None).start()
        try:
            wait_subscribed(pub, lambda: ingester.received > 0)
            for leaf, payload in (
                    (Leaf.STATUS, encode(Status(device, "idle", "rpi4", active_version=3, boot=1, seq=1))),
                    (Leaf.METRICS, encode(Metrics(device, 3, 3.0, 4.0, 80.0, 10, True, boot=1, seq=2,
                                                  drift={"version": 3, **monitor.scores().to_dict()},
                                                  accuracy=accuracy.snapshot(), shadow=shadow.to_dict())))):
                pub.publish(topic("edgefleet", device, leaf), payload, qos=1).wait_for_publish(5)
            until(lambda: ingester.drift_events == 1, 30, "the drift event recorded")
        finally:
            pub.stop()
        row = f"{device}-3"
        page.wait_for_selector(f"[data-testid=quality-state-{row}][data-value='drifting']", timeout=20_000)
        quality = json.loads(urllib.request.urlopen(dash.url + "api/quality", timeout=10).read())
        [d] = quality["devices"]
        [v] = d["versions"]
        drift, acc = v["drift"], v["accuracy"]
        assert (drift["samples"], drift["max_mean_shift"], acc["labelled"], acc["correct"]) == (300, 3.0, 3, 2)
        for key, value, text in (("psi-outputs", drift["psi_outputs"], f"{drift['psi_outputs']:.3f}"),
                                 ("psi-confidence", drift["psi_confidence"], f"{drift['psi_confidence']:.3f}"),
                                 ("mean-shift", drift["max_mean_shift"], "3.000"), ("samples", 300, "300"),
                                 ("accuracy", acc["accuracy"], "67%"), ("labelled", 3, "3")):
            cell = page.locator(f"[data-testid=quality-{key}-{row}]")
            assert float(cell.get_attribute("data-value")) == pytest.approx(value, rel=1e-12), key
            assert cell.inner_text() == text, (key, cell.inner_text())
        assert page.locator(f"[data-testid=quality-state-{row}]").inner_text() == "drifting"
        agreement = page.locator(f"[data-testid=shadow-agreement-{device}-4]")
        assert (float(agreement.get_attribute("data-value")), agreement.inner_text()) == (0.9, "90%")
        [s] = d["shadow"]
        assert page.locator(f"[data-testid=shadow-candidate-p50-{device}-4]").inner_text() == \
            f"{s['candidate_p50_ms']:.2f}" == "2.50"
        page.wait_for_selector("[data-testid=events] :text('drift_detected')", timeout=15_000)
        OUTPUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(OUTPUT / "dashboard-quality.png"), full_page=True)


def test_a_rollout_s_shadow_decision_is_drawn_with_its_deployment(chromium, tmp_path):
    """A deployment whose rollout went through a shadow stage: the deployments table says what the stage decided,
    for which candidate, on how many compared requests and with what agreement, as the store's rollout record has
    it (pipeline.ota.shadow.ShadowResult.to_dict)."""
    from pipeline.dashboard import Dashboard

    db = tmp_path / "fleet.db"
    store = FleetStore(db)
    devices = [{"device_id": d, "verdict": "pass", "reason": None, "samples": n, "agreement": a}
               for d, n, a in (("pi-1", 240, 0.975), ("pi-2", 210, 0.99))]
    shadow = {"candidate": 12, "decision": "promoted", "devices": devices, "policy": {"min_samples": 200}}
    store.record(name="m", target="rpi4", version=12, sha256="0" * 64, artifact=str(tmp_path), kind="deploy",
                 status="succeeded", reason=None,
                 results=[{"device_id": d["device_id"], "status": "activated", "active_version": 12} for d in devices],
                 rollout={"canaries": ["pi-1"], "aborted": False, "shadow": shadow})
    store.close()
    with Dashboard(db, port=0) as dash:
        page = chromium.new_page(viewport={"width": 1400, "height": 900})
        page.goto(dash.url)
        cell = page.wait_for_selector("[data-testid^=deployment-reason-]:has-text('shadow promoted')", timeout=15_000)
        assert cell.inner_text() == "shadow promoted v12: 450 requests compared on 2 device(s), agreement ≥ 98%."
