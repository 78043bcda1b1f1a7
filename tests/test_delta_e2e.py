"""Delta updates end to end: real agents, a real Mosquitto, real ONNX models built with torch and run by onnxruntime.

v1 goes out in full; v2 (the head fine-tuned) as a delta of v1, built from what the fleet store says each device runs,
activates with the installed file byte-identical to v2 and about the delta's chunks on the wire; a delta against a
model the device does not run is refused with delta_base_mismatch, both slots untouched, then the full artifact
activates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import make_artifact
from device_agent.delta import BASE_MISMATCH
from device_agent.protocol import ResultCode
from device_agent.slots import SlotStore
from pipeline.export import export_model
from pipeline.fleet import FleetStore
from pipeline.ota import LocalFleet, deliver
from pipeline.ota.deltas import deliver_wave, running_versions, stored_bases

pytestmark = pytest.mark.slow  # delivers end to end through a real broker

PREFIX = "edgefleet"
CHUNK = 1024  # small chunks, so that the chunks a delta saves are counted


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).eval()


def head_finetuned(model: nn.Module, seed: int) -> nn.Module:
    model = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model[-1].parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 1, 8, 8)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    return model.eval()


@pytest.fixture
def fleet(mosquitto, key_dir, tmp_path):
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 2, key_dir / "signing.pub", PREFIX) as f:
        yield f


def slots(fleet, device: str) -> SlotStore:
    return SlotStore(fleet.config_path(device).parent / "state")


def installed(fleet, device: str) -> bytes:
    return slots(fleet, device).active().path.read_bytes()


def record(store: FleetStore, art, results) -> None:
    """What the deploy stage records: the deployment (its artifact's directory) and what each device said."""
    store.record(name="tiny", target="rpi4", version=art.version, sha256=art.sha256, artifact=str(art.dir),
                 kind="deploy", status="succeeded", reason=None, results=[r.to_dict() for r in results])
    store.ingest([(r.device_id, "status", {"active_version": r.active_version, "state": r.status.value})
                  for r in results])


def test_delta_from_the_version_the_fleet_runs_then_a_refused_delta_falls_back(mosquitto, fleet, key_dir, tmp_path):
    models = tmp_path / "models"
    base = cnn(0)
    v1_path = export_model("onnx", base, (1, 8, 8), models / "v1" / "model.onnx", 17)
    v2_path = export_model("onnx", head_finetuned(base, 1), (1, 8, 8), models / "v2" / "model.onnx", 17)
    arts = tmp_path / "artifacts"
    v1 = make_artifact(v1_path, arts, key_dir, version=1, chunk_size=CHUNK)
    devices = fleet.device_ids
    store = FleetStore(tmp_path / "fleet.db")
    try:
        first = deliver(mosquitto.config, PREFIX, v1, devices, 60)
        assert [r.status for r in first] == ["activated"] * 2
        record(store, v1, first)

        # v2 as a delta of v1: one group (both run v1), activated, the installed file byte-identical to v2
        v2 = make_artifact(v2_path, arts, key_dir, version=2, chunk_size=CHUNK)
        wave = deliver_wave(mosquitto.config, PREFIX, v2, devices, 60, running=running_versions(store, devices),
                            bases=stored_bases(store, "rpi4"), key_dir=key_dir)
        [group] = wave.groups
        assert group.is_delta and group.base_version == 1 and group.devices == devices and group.fallback == []
        delta = group.artifact
        assert delta.manifest.delta.base_sha256 == v1.manifest.raw_sha256 and delta.size_bytes * 10 < v2.size_bytes
        for r in wave.results:
            assert r.status == "activated" and r.active_version == 2, (r.reason, r.events)
            assert installed(fleet, r.device_id) == v2_path.read_bytes()
            assert r.chunks_served <= delta.manifest.chunks + 2  # the delta's chunks (all of them when unicast)
        # on the wire: the delta's bytes, once (broadcast) or per device (unicast), never v2's
        frames = delta.manifest.chunks * 200  # a chunk frame's header (job id, index, hash) at most
        assert delta.size_bytes <= wave.egress_bytes <= len(devices) * (delta.size_bytes + frames)
        assert wave.egress_bytes * 5 < v2.size_bytes
        record(store, v2, wave.results)
        report = json.loads(json.dumps(wave.to_dict()))
        assert report["groups"][0]["artifact"] == "delta" and report["groups"][0]["delta"]["ratio"] >= 10

        # v3 built against a "v2" the devices never ran (the store's artifact of v2 replaced by another model):
        # refused with delta_base_mismatch, both slots as they were
        other = make_artifact(export_model("onnx", cnn(7), (1, 8, 8), models / "o" / "model.onnx", 17), tmp_path / "x",
                              key_dir, version=2, chunk_size=CHUNK)
        v3_path = export_model("onnx", head_finetuned(cnn(7), 2), (1, 8, 8), models / "v3" / "model.onnx", 17)
        v3 = make_artifact(v3_path, arts, key_dir, version=3, chunk_size=CHUNK)
        before = {d: (slots(fleet, d).active(), slots(fleet, d).slot_status("a"), slots(fleet, d).slot_status("b"))
                  for d in devices}
        wrong = deliver_wave(mosquitto.config, PREFIX, v3, devices[:1], 60, running={devices[0]: 2},
                             bases=lambda version: other, key_dir=key_dir)
        [group] = wrong.groups
        assert group.is_delta and group.fallback == devices[:1]
        [r] = wrong.results
        fallback = [e for e in r.events if e["kind"] == "delta_fallback"]
        assert fallback and fallback[0]["message"].startswith(BASE_MISMATCH), r.events
        assert any(e["kind"] == "refused" and BASE_MISMATCH in e["message"] for e in r.events)
        assert r.status == "activated" and r.active_version == 3
        assert installed(fleet, devices[0]) == v3_path.read_bytes()
        assert r.chunks_served >= group.artifact.manifest.chunks + v3.manifest.chunks  # both went out, unicast
        assert wrong.egress_bytes >= group.artifact.size_bytes + v3.size_bytes

        # the refusal itself, on the other device: a plain delivery of the same delta
        [refused] = deliver(mosquitto.config, PREFIX, group.artifact, devices[1:], 60)
        assert refused.status == "failed" and refused.reason.startswith(BASE_MISMATCH)
        assert refused.result_code == ResultCode.UNSUPPORTED_PACKAGE and refused.active_version == 2
        s = slots(fleet, devices[1])
        assert (s.active(), s.slot_status("a"), s.slot_status("b")) == before[devices[1]]
        assert installed(fleet, devices[1]) == v2_path.read_bytes()
    finally:
        store.close()


def test_a_deploy_sends_the_device_a_delta_against_the_version_it_runs(mosquitto, key_dir, tmp_path):
    """Through the deploy's own delivery stage, twice on one workdir (its local agent keeps its slots): the first
    delivery is the full artifact, the second, a fine-tuned head, a delta against the first, which the store
    says the device runs; the device activates it, byte for byte the new model."""
    import hashlib

    import torch
    from torch import nn

    from conftest import make_artifact, small_deploy_config
    from pipeline.broker import external_broker
    from pipeline.config import load_deploy
    from pipeline.export import export_model
    from pipeline.ota import stage
    from pipeline.targets import target_for_deploy
    from pipeline.ui import UI

    cfg = load_deploy(small_deploy_config(tmp_path, local_agents=1))
    target, workdir = target_for_deploy(cfg, "rpi4"), cfg.resolve(cfg.workdir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10)).eval()
    v1 = export_model("onnx", model, (1, 8, 8), tmp_path / "v1" / "m.onnx", 17)
    with torch.no_grad():
        model[3].bias += 0.01  # a retrained head
    v2 = export_model("onnx", model, (1, 8, 8), tmp_path / "v2" / "m.onnx", 17)
    arts = workdir / "artifacts"
    first, second = make_artifact(v1, arts, key_dir, version=100), make_artifact(v2, arts, key_dir, version=101)
    ui = UI()
    [d1], info1 = stage.deliver_stage(cfg.fleet, external_broker(cfg), target, first, workdir, ui, key_dir=key_dir)
    assert d1["status"] == "activated" and info1["deltas"][0]["groups"][0]["artifact"] == "full"
    [d2], info2 = stage.deliver_stage(cfg.fleet, external_broker(cfg), target, second, workdir, ui, key_dir=key_dir)
    [group] = info2["deltas"][0]["groups"]
    assert d2["status"] == "activated" and d2["active_version"] == 101
    assert group["artifact"] == "delta" and group["base_version"] == 100 and group["bytes"] * 10 < second.size_bytes
    assert d2["bytes_sent"] < second.size_bytes / 5  # what travelled: the delta's chunks
    installed = [p for p in (workdir / "devices").rglob("slots/*/m.onnx")
                 if hashlib.sha256(p.read_bytes()).hexdigest() == second.manifest.raw_sha256]
    assert len(installed) == 1  # the new model, rebuilt from the old one and the delta, in a slot
