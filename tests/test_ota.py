"""A real agent process, a real Mosquitto: good, tampered, mis-signed, stale and unhealthy updates."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_artifact
from device_agent.manifest import Manifest, sign_envelope
from pipeline.bundle import load_or_create
from pipeline.ota import LocalFleet, deliver

pytestmark = pytest.mark.slow  # delivers end to end through a real broker

PREFIX = "edgefleet"


@pytest.fixture
def fleet(mosquitto, key_dir, tmp_path):
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as f:
        yield f


def send(mosquitto, artifact, fleet, timeout=30):
    [result] = deliver(mosquitto.config, PREFIX, artifact, fleet.device_ids, timeout)
    return result


def local_state(fleet) -> dict:
    out = subprocess.run([sys.executable, "-m", "device_agent.cli", "status", "--config",
                          str(fleet.config_path(fleet.device_ids[0]))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_agent_accepts_good_and_refuses_bad_updates(mosquitto, fleet, tiny_onnx, key_dir, tmp_path):
    arts = tmp_path / "artifacts"
    good = make_artifact(tiny_onnx, arts, key_dir, version=10)
    r = send(mosquitto, good, fleet)
    assert r.status == "activated" and r.active_version == 10
    assert r.metrics["latency_ms_p50"] > 0 and r.metrics["rss_mb"] > 10 and r.metrics["emulated"] is True
    assert r.states[:2] == ["downloading", "verifying"] and r.states[-1] == "activated"
    m = r.metrics
    assert m["latency_ms_p99"] >= m["latency_ms_p95"] and m["throughput_ips"] > 0 and m["slot"] == "a"
    assert m["energy_source"] in ("predicted", None) or m["energy_source"].startswith("measured:")

    # 1. a flipped byte in the model: hash mismatch, refused, v10 stays active, refusal reported
    flipped = tmp_path / "flipped.onnx"
    data = bytearray(tiny_onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    tampered = make_artifact(tiny_onnx, arts, key_dir, version=11)
    r = send(mosquitto, dataclasses.replace(tampered, model_path=flipped), fleet)
    assert r.status == "failed" and r.active_version == 10
    assert "sha256" in r.reason and r.result_code == 5
    assert any(e["kind"] == "refused" for e in r.events)

    # 2. signed by a key the device does not trust
    rogue = make_artifact(tiny_onnx, arts, tmp_path / "rogue-keys", version=12)
    r = send(mosquitto, rogue, fleet)
    assert r.status == "failed" and r.active_version == 10 and "trust" in r.reason

    # 3. a manifest altered after signing (version bumped by hand)
    forged = copy.deepcopy(good.envelope)
    forged["signed"]["version"] = 13
    r = send(mosquitto, dataclasses.replace(good, envelope=forged), fleet)
    assert r.status == "failed" and "does not verify" in r.reason and r.active_version == 10

    # 4. a replay of the active version
    r = send(mosquitto, good, fleet)
    assert r.status == "failed" and "not newer" in r.reason

    # 5. correctly signed, but its golden outputs do not match what the model computes: rolled back
    unhealthy = make_artifact(tiny_onnx, arts, key_dir, version=14)
    signed = copy.deepcopy(unhealthy.envelope["signed"])
    out = signed["golden"]["cases"][0]["outputs"][0]
    out["data"] = base64.b64encode(np.full(out["shape"], 9.0, np.float32).tobytes()).decode()
    env = sign_envelope(signed, load_or_create(key_dir))
    r = send(mosquitto, dataclasses.replace(unhealthy, envelope=env, manifest=Manifest.from_signed(signed)), fleet)
    assert r.status == "rolled_back" and r.active_version == 10 and "golden" in r.reason

    state = local_state(fleet)
    assert state["active"]["version"] == 10 and state["active"]["sha256"] == good.sha256

    # 6. the next good version still goes through, into the other slot
    r = send(mosquitto, make_artifact(tiny_onnx, arts, key_dir, version=15), fleet)
    assert r.status == "activated" and r.active_version == 15
    state = local_state(fleet)
    assert state["active"]["slot"] == "b"  # v10 stays in a, ready for a rollback
    assert state["active"]["version"] == 15 and state["state"]["highest_version"] == 15


def test_agent_for_another_target_refuses(mosquitto, fleet, tiny_onnx, key_dir, tmp_path):
    art = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=20, target="jetson-orin-nano")
    r = send(mosquitto, art, fleet)
    assert r.status == "failed" and "target 'jetson-orin-nano'" in r.reason and r.result_code == 6


def test_sparse_model_travels_deflated_and_decodes_on_the_device(mosquitto, fleet, tiny_model, key_dir, tmp_path):
    import torch

    from pipeline.export import export_model

    sparse = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in sparse.parameters():
            p.mul_((torch.rand_like(p) > 0.9).float())  # 90% zeros
    path = export_model("onnx", sparse, (1, 8, 8), tmp_path / "sparse.onnx", 17)
    art = make_artifact(path, tmp_path / "a", key_dir, version=30)
    assert art.manifest.encoding == "zlib" and art.size_bytes < 0.5 * art.manifest.raw_length
    r = send(mosquitto, art, fleet)
    assert r.status == "activated" and r.active_version == 30
    assert local_state(fleet)["active"]["sha256"] == art.manifest.raw_sha256

    # a correctly signed manifest whose decoded hash is wrong: refused after decoding, v30 stays
    bad = make_artifact(path, tmp_path / "b", key_dir, version=31)
    signed = copy.deepcopy(bad.envelope["signed"])
    signed["artifact"]["raw_sha256"] = "0" * 64
    env = sign_envelope(signed, load_or_create(key_dir))
    r = send(mosquitto, dataclasses.replace(bad, envelope=env, manifest=Manifest.from_signed(signed)), fleet)
    assert r.status == "failed" and "decoded model" in r.reason and r.active_version == 30
