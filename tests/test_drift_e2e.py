"""Drift from real traffic, end to end: a digits classifier trained here is signed with the reference deploy
computes (its held-out split), delivered to a real agent over a real Mosquitto; an application sends the
held-out images through the agent's inference API, then the same images brighter; the agent's monitor scores
its window, its metrics carry the scores, ``pipeline fleet ingest`` stores them and raises one drift event at the
crossing, and ``pipeline fleet drift`` shows it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from fleet_probe import probe_stored, stop_ingester, until, wait_subscribed
from torch import nn

from conftest import make_artifact
from device_agent.client import Client
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, encode, topic
from pipeline.fleet import FleetStore
from pipeline.fleet.quality import quality_summary
from pipeline.ota import LocalFleet, deliver

pytestmark = pytest.mark.slow
PREFIX = "edgefleet"
WINDOW = 400  # slides by an eighth: holds 350 at the least, above min_samples (200)


def digits(tmp_path):
    """A small CNN on scikit-learn's digits (two seconds of training), exported; the held-out split."""
    from sklearn.datasets import load_digits

    from pipeline.export import export_model

    d = load_digits()
    x, y = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), d.target
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(300):
        idx = torch.randint(0, len(xt), (64,))
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export_model("onnx", model.eval(), (1, 8, 8), tmp_path / "digits.onnx", 17), x[test]


def drift_of(db, device):
    if not db.exists():
        return None
    store = FleetStore(db, readonly=True)
    try:
        devices = quality_summary(store, device)["devices"]
    finally:
        store.close()
    return devices[0]["versions"][0]["drift"] if devices and devices[0]["versions"] else None


def test_held_out_traffic_is_quiet_and_brighter_images_raise_one_drift_event(mosquitto, key_dir, tmp_path):
    from pipeline.bundle.drift import drift_reference

    model, held_out = digits(tmp_path)
    reference, _ = drift_reference(model, held_out, classes=10)
    reference = dataclasses.replace(reference, window=WINDOW)
    art = make_artifact(model, tmp_path / "artifacts", key_dir, version=20, target="host", reference=reference)
    db = tmp_path / "fleet.db"
    ingest = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fleet", "ingest", "--broker",
                               f"127.0.0.1:{mosquitto.port}", "--db", str(db)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    host = MqttLink(mosquitto.config, "host-test", lambda t, p: None).start()
    try:
        wait_subscribed(host, probe_stored(db))
        with LocalFleet(tmp_path / "devices", mosquitto.config, "host", 1, key_dir / "signing.pub", PREFIX) as fleet:
            [device] = fleet.device_ids
            [r] = deliver(mosquitto.config, PREFIX, art, [device], 60)
            assert r.status == "activated"

            def traffic(images, n):
                rng = np.random.default_rng(n)
                with Client(str(fleet.socket_path(device))) as c:
                    for img in images[rng.integers(0, len(images), n)]:
                        c.infer(img[None])
                host.publish(topic(PREFIX, device, Leaf.CMD), encode({"command": "report", "id": f"r{n}"}),
                             qos=1).wait_for_publish(10)

            traffic(held_out, WINDOW)
            until(lambda: (drift_of(db, device) or {}).get("samples", 0) >= 200, 60, "a window of 200 stored")
            quiet = drift_of(db, device)
            traffic(np.clip(held_out + 0.3, 0, 1), WINDOW + 1)  # the same images, brighter: a camera's exposure
            until(lambda: (drift_of(db, device) or {}).get("state") == "drifting", 60, "the brighter window, drifting")
            shifted = drift_of(db, device)
    finally:
        host.stop()
        err = stop_ingester(ingest)
    assert ingest.returncode == 0, err[-3000:]
    assert quiet["state"] == "ok", quiet
    assert quiet["max_mean_shift"] < 0.1 and quiet["psi_outputs"] < 0.25 and quiet["psi_confidence"] < 0.25, quiet
    assert shifted["max_mean_shift"] > 0.5, shifted
    assert any(d["score"] == "mean_shift" for d in shifted["drifting"])
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "drift", "--db", str(db), "--json"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [e for e in json.loads(out.stdout)["events"] if e["device_id"] == device]
    assert [e["kind"] for e in events] == ["drift_detected"] and events[0]["version"] == 20
