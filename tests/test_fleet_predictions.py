"""Every deployed model checks its prediction, end to end: a delivery to real local agents through a real
Mosquitto records the predictions with the deployment, and what the agents measured is set against this host's
prediction (they emulate an rpi4 on this host), never the rpi4's, in `pipeline fleet status --json`, on
/metrics (as promtool checks it) and on the dashboard's panel in a real Chromium."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from conftest import require, small_deploy_config

pytestmark = pytest.mark.slow
#: far from anything this host measures: a comparison with it would stand out as about -100%
RPI4_PREDICTED = {"latency_ms": 1000.0, "peak_memory_mb": 5000.0, "energy_mj": 2.0, "basis": "roofline (test)"}


@pytest.fixture(scope="module")
def deployed(tiny_onnx, tmp_path_factory):
    """A deploy's delivery stage to two local agents emulating rpi4: (deploy.yaml, fleet.db, delivery, host
    prediction)."""
    from pipeline.broker import external_broker, mosquitto_binary
    from pipeline.bundle import build_artifact, load_or_create
    from pipeline.config import load_deploy
    from pipeline.ota import stage
    from pipeline.ota.local_fleet import host_prediction
    from pipeline.targets import target_for_deploy
    from pipeline.ui import UI

    require(mosquitto_binary() is not None, "mosquitto")
    tmp = tmp_path_factory.mktemp("predictions")
    path = small_deploy_config(tmp, local_agents=2, local_broker="mosquitto")
    cfg = load_deploy(path)
    workdir = cfg.resolve(cfg.workdir)
    load_or_create(tmp / "keys")
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    art = build_artifact(tiny_onnx, tmp / "artifacts", name="tiny", version=100, target="rpi4",
                         runtime="onnxruntime", golden_inputs=x, budgets={}, predicted=RPI4_PREDICTED,
                         health={"runs": 5}, key_dir=tmp / "keys")
    delivery, _ = stage.deliver_stage(cfg.fleet, external_broker(cfg), target_for_deploy(cfg, "rpi4"), art, workdir,
                                      UI(quiet=True), force=True)
    assert [d["status"] for d in delivery] == ["activated", "activated"], delivery
    host = host_prediction(art)
    assert host is not None and host["latency_ms"] > 0
    return path, workdir / "fleet.db", delivery, host


def status(cfg, db, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--config", str(cfg), "--db",
                           str(db), *extra], capture_output=True, text=True, timeout=120, check=True)


def test_fleet_status_sets_emulated_agents_against_this_host_s_prediction(deployed):
    cfg, db, delivery, host = deployed
    out = json.loads(status(cfg, db, "--json").stdout)
    assert {d["device_id"] for d in out["devices"]} == {"rpi4-emu-0", "rpi4-emu-1"}
    check = out["predictions"]
    assert check["error"] == "(measured - predicted) / predicted"
    # the agents ran on this host: only the host's prediction is compared, the rpi4's never is
    assert {c["basis"] for c in check["classes"]} == {"host"}
    by = {c["metric"]: c for c in check["classes"]}
    assert set(by) == {"latency_p50", "latency_p95", "memory_rss"}
    for metric, measured, predicted in (("latency_p50", "latency_ms_p50", "latency_ms"),
                                        ("latency_p95", "latency_ms_p95", "latency_ms"),
                                        ("memory_rss", "rss_mb", "peak_memory_mb")):
        c = by[metric]
        assert (c["target"], c["predicted_for"], c["devices"], c["comparisons"], c["samples"]) == \
            ("rpi4", "host", 2, 2, 2), c
        errors = [(d["metrics"][measured] - host[predicted]) / host[predicted] for d in delivery]
        assert c["median_error"] == pytest.approx(statistics.median(errors)), metric
        assert c["within_10pct"] == sum(abs(e) <= 0.1 for e in errors) / 2
        assert c["skipped"] == {"invalid": 0, "unpredicted": 0}
    [v] = [v for v in check["versions"] if v["metric"] == "latency_p50"]
    assert (v["version"], v["predicted"], v["prediction_basis"]) == (100, host["latency_ms"], host.get("basis"))

    table = status(cfg, db).stderr  # the same check as a table, saying what was compared with what
    assert "Predictions against the fleet" in table and "host's (emulated)" in table
    assert f"{by['latency_p50']['median_error']:+.1%}" in table


def test_metrics_and_the_dashboard_panel_show_the_same_check(deployed, chromium):
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.dashboard import Dashboard

    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (apt-get install prometheus)")
    cfg, db, _, _ = deployed
    check = json.loads(status(cfg, db, "--json").stdout)["predictions"]
    with Dashboard(db, port=0) as dash:
        with urllib.request.urlopen(dash.url + "metrics", timeout=10) as r:
            body = r.read()
        page = chromium.new_page(viewport={"width": 1400, "height": 1300})
        try:
            page.goto(dash.url)
            for c in check["classes"]:
                cid = f"{c['target']}-{c['basis']}-{c['metric']}"
                cell = page.wait_for_selector(f"[data-testid=prediction-error-{cid}]", timeout=15_000)
                assert float(cell.get_attribute("data-value")) == pytest.approx(c["median_error"], rel=1e-9)
                assert cell.inner_text() == f"{100 * c['median_error']:+.1f}%"
                assert page.locator(f"[data-testid=prediction-basis-{cid}]").inner_text() == \
                    "host prediction (emulated agents)"
                assert float(page.locator(f"[data-testid=prediction-within10-{cid}]").get_attribute("data-value")) \
                    == c["within_10pct"]
                assert page.locator(f"[data-testid=prediction-devices-{cid}]").inner_text() == "2"
            assert page.locator("[data-testid=predictions] tbody tr").count() == len(check["classes"]) == 3
        finally:
            page.close()

    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
        (checked.stdout + checked.stderr).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    for c in check["classes"]:
        labels = (("basis", "host"), ("metric", c["metric"]), ("target", "rpi4"))
        assert samples[("edgefleet_prediction_error_ratio", labels)] == pytest.approx(c["median_error"])
        assert samples[("edgefleet_prediction_devices", labels)] == 2
    assert not [k for k in samples if k[0].startswith("edgefleet_prediction_") and ("basis", "target") in k[1]]
