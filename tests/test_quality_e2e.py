"""Drift on a real broker with the host's own commands: ``pipeline fleet ingest --config deploy.yaml`` (its ``drift:``
thresholds, not the defaults) takes metrics a device publishes on a real Mosquitto, with drift scores from a real
DriftMonitor fed arrays; ``pipeline fleet drift --json`` shows the state and the one event the crossing raised, and
the ingester's closing line counts the malformed value it left out."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from fleet_probe import probe_stored, stop_ingester, until, wait_subscribed

from conftest import small_deploy_config
from device_agent.drift import DriftMonitor, Reference
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, Metrics, encode, topic
from pipeline.fleet import FleetStore
from pipeline.fleet.quality import quality_summary

pytestmark = pytest.mark.slow
DEVICE = "rpi4-cam-7"


def scores(shift: float) -> dict:
    """A regressor's drift (no output block: the mean shift only) over 100 requests ``shift`` std off the mean."""
    monitor = DriftMonitor(Reference(1000, 1, (0.0, 0.0), (1.0, 1.0)), window=100)
    for _ in range(100):
        assert monitor.observe(np.full((1, 2, 3), shift, np.float32), np.zeros((1, 1), np.float32))
    return {"version": 5, **monitor.scores().to_dict()}


def drift_of(db) -> dict | None:
    if not db.exists():
        return None
    store = FleetStore(db, readonly=True)
    try:
        devices = quality_summary(store, DEVICE)["devices"]
    finally:
        store.close()
    return devices[0]["versions"][0]["drift"] if devices and devices[0]["versions"] else None


def test_deploy_yaml_s_thresholds_decide_the_drift_events(mosquitto, tmp_path):
    cfg = small_deploy_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["drift"] = {**data.get("drift", {}), "mean_shift": 2.0, "min_samples": 50}
    cfg.write_text(yaml.safe_dump(data))
    db = tmp_path / "fleet.db"
    ingest = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fleet", "ingest", "--config", str(cfg),
                               "--broker", f"127.0.0.1:{mosquitto.port}", "--db", str(db)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    pub = MqttLink(mosquitto.config, "device", lambda t, p: None).start()
    try:
        wait_subscribed(pub, probe_stored(db))

        def send(seq: int, drift) -> None:
            m = Metrics(DEVICE, 5, 1.0, 2.0, 80.0, 10, False, boot=1, seq=seq, drift=drift)
            pub.publish(topic("edgefleet", DEVICE, Leaf.METRICS), encode(m), qos=1).wait_for_publish(10)

        send(1, scores(1.0))  # a shift of 1 std: above the default threshold (0.25), within deploy.yaml's (2.0)
        until(lambda: (drift_of(db) or {}).get("state") == "ok", 60, "the first report stored, ok")
        send(2, scores(2.5))
        send(3, "not scores")
        until(lambda: (drift_of(db) or {}).get("state") == "drifting", 60, "the second report stored, drifting")
    finally:
        pub.stop()
        err = stop_ingester(ingest)
    assert ingest.returncode == 0, err[-3000:]
    assert "left out 1 malformed drift, accuracy or shadow value(s)" in err and "recorded 1 drift event(s)" in err

    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "drift", "--db", str(db), "--device", DEVICE,
                          "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    shown = json.loads(out.stdout)
    [d] = shown["devices"]
    [v5] = d["versions"]
    assert v5["version"] == 5 and v5["drift"]["state"] == "drifting" and v5["drift"]["max_mean_shift"] == 2.5
    assert v5["drift"]["thresholds"] == {"psi_outputs": 0.25, "psi_confidence": 0.25, "mean_shift": 2.0,
                                         "min_samples": 50}
    assert v5["drift"]["drifting"] == [{"score": "mean_shift", "value": 2.5, "threshold": 2.0, "channel": 0}]
    [event] = shown["events"]
    assert (event["kind"], event["device_id"], event["version"]) == ("drift_detected", DEVICE, 5)
    assert f"drift detected on {DEVICE} v5: mean_shift 2.5 > 2 (channel 0)" in event["message"]
