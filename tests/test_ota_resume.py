"""Transfers that survive: an agent killed mid-transfer, a broker restarted mid-transfer, a corrupt chunk.

Real Mosquitto, real agent processes, a ~12 MB model (about 380 chunks), so there is a middle to cut in.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_artifact
from device_agent.config import BrokerConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, StreamGet, encode_chunk, topic
from pipeline.export import export_model
from pipeline.ota import LocalFleet, deliver

pytestmark = pytest.mark.slow
PREFIX = "edgefleet"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1536), nn.ReLU(), nn.Linear(1536, 1536), nn.ReLU(),
                          nn.Linear(1536, 10)).eval()
    return export_model("onnx", model, (1, 8, 8), tmp_path_factory.mktemp("big") / "big.onnx", 17)


@pytest.fixture
def fleet(mosquitto, key_dir, tmp_path):
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as f:
        yield f


def chunks_on_disk(fleet) -> int:
    state = fleet.config_path(fleet.device_ids[0]).parent / "state" / "downloads"
    for have in state.glob("*/have.json"):
        try:
            return len(json.loads(have.read_text())["have"])
        except (OSError, ValueError):
            return 0
    return 0


def deliver_in_background(broker: BrokerConfig, artifact, fleet, timeout=120):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", deliver(broker, PREFIX, artifact, fleet.device_ids,
                                                                       timeout)[0]))
    t.start()
    return t, out


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_agent_killed_mid_transfer_resumes_without_starting_over(mosquitto, fleet, big_model, key_dir, tmp_path):
    art = make_artifact(big_model, tmp_path / "a", key_dir, version=40)
    total = art.manifest.chunks
    assert total > 300 and art.manifest.encoding == "identity"
    thread, out = deliver_in_background(mosquitto.config, art, fleet)
    wait_for(lambda: chunks_on_disk(fleet) >= total // 3, 60, "a third of the chunks on disk")
    fleet.procs[fleet.device_ids[0]].kill()  # kill -9, mid-transfer
    fleet.procs[fleet.device_ids[0]].wait()
    kept = chunks_on_disk(fleet)
    assert total // 3 <= kept < total
    fleet.spawn(fleet.device_ids[0])
    thread.join(150)
    r = out["r"]
    assert r.status == "activated" and r.active_version == 40, (r.reason, fleet.log_tail(fleet.device_ids[0]))
    assert r.chunks_resent <= 2, r.chunks_resent  # the broker kept the rest; nothing started over
    assert r.chunks_served - r.chunks_resent == total
    assert any(e["kind"] == "resumed" for e in r.events)


def test_broker_restart_mid_transfer_completes(mosquitto, fleet, big_model, key_dir, tmp_path):
    art = make_artifact(big_model, tmp_path / "a", key_dir, version=41)
    thread, out = deliver_in_background(mosquitto.config, art, fleet)
    wait_for(lambda: chunks_on_disk(fleet) >= art.manifest.chunks // 4, 60, "a quarter of the chunks")
    mosquitto.restart()  # every session and queued message is gone: both ends reconnect and resume
    thread.join(150)
    r = out["r"]
    assert r.status == "activated" and r.active_version == 41, (r.reason, fleet.log_tail(fleet.device_ids[0]))
    assert r.chunks_served < 2 * art.manifest.chunks  # resumed, not restarted


def test_corrupt_chunk_is_detected_and_fetched_again(mosquitto, fleet, tiny_onnx, key_dir, tmp_path):
    art = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=42)
    device = fleet.device_ids[0]
    injected = threading.Event()

    def on_request(name, payload):  # a man in the middle: the first request gets a damaged chunk 0 first
        req = StreamGet.parse(payload)
        if not injected.is_set():
            frame = bytearray(encode_chunk(req.job_id, 0, b"\x00" * min(art.size_bytes, 1024)))
            frame[-1] ^= 0xFF
            mitm.publish(topic(PREFIX, device, Leaf.STREAM_DATA), bytes(frame), qos=1)
            injected.set()

    mitm = MqttLink(mosquitto.config, "mitm", on_request, [(topic(PREFIX, device, Leaf.STREAM_GET), 1)]).start()
    try:
        [r] = deliver(mosquitto.config, PREFIX, art, fleet.device_ids, 60)
    finally:
        mitm.stop()
    assert injected.is_set()
    assert r.status == "activated" and r.active_version == 42
    assert any(e["kind"] == "chunk_corrupt" for e in r.events)
    np.testing.assert_equal(r.chunks_served >= art.manifest.chunks, True)
