"""pipeline.bundle.delta: the weight-aware and binary patches of real exported models, applied by the device's own
code (device_agent.delta) to the byte, run by onnxruntime; the signed delta artifact; a wave's plan."""

from __future__ import annotations

import copy
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import make_artifact
from device_agent.delta import Delta, apply_delta
from device_agent.manifest import Manifest, keyid, load_public_key, verify_envelope
from pipeline.bundle import load_artifact
from pipeline.bundle import delta as bundle_delta
from pipeline.bundle.delta import build_patches, delta_artifact, onnx_tensors
from pipeline.export import export_model
from pipeline.fleet import FleetStore
from pipeline.ota.deltas import plan, running_versions, stored_bases

sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731


def cnn(seed: int = 0) -> nn.Module:
    """A small CNN on 1x8x8: 14k weights in the body, a 330-weight classifier head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).eval()


def finetune(model: nn.Module, params, steps: int = 3, lr: float = 1e-3, seed: int = 1) -> nn.Module:
    """A few SGD steps on random data, only on ``params`` (names' prefixes), the rest frozen."""
    model = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    chosen = [p for n, p in model.named_parameters() if n.startswith(tuple(params))]
    opt = torch.optim.SGD(chosen, lr=lr)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def apply(patch: bytes, base: bytes, new: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "patch").write_bytes(patch)
        (d / "base").write_bytes(base)
        apply_delta(d / "patch", d / "base", d / "out", Delta(1, sha(base)), len(new), sha(new))
        return (d / "out").read_bytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """v1, v2 = v1 with its head fine-tuned, v3 = v1 with every weight fine-tuned (ONNX files)."""
    d = tmp_path_factory.mktemp("delta-models")
    v1 = cnn()
    out = {"v1": export_model("onnx", v1, (1, 8, 8), d / "v1" / "model.onnx", 17),
           "head": export_model("onnx", finetune(v1, ["8."]), (1, 8, 8), d / "head" / "model.onnx", 17),
           "all": export_model("onnx", finetune(v1, [""]), (1, 8, 8), d / "all" / "model.onnx", 17),
           "other": export_model("onnx", cnn(seed=5), (1, 8, 8), d / "other" / "model.onnx", 17)}
    return out


def test_onnx_tensors_are_the_initializers_raw_bytes(models):
    data = models["v1"].read_bytes()
    found = {t.name: data[t.start:t.end] for t in onnx_tensors(data)}
    model = onnx.load(str(models["v1"]))
    assert {i.name: i.raw_data for i in model.graph.initializer if i.raw_data} == {
        k: v for k, v in found.items() if k in {i.name for i in model.graph.initializer}}
    assert {t.width for t in onnx_tensors(data) if t.name == "8.weight"} == {4}  # float32
    assert onnx_tensors(b"not a model at all") is None and onnx_tensors(b"") is None


def test_head_only_finetune_is_a_small_patch_that_rebuilds_the_model_byte_for_byte(models):
    import onnxruntime as ort

    base, new = models["v1"].read_bytes(), models["head"].read_bytes()
    patches = build_patches(base, new)
    assert patches["tensors"] is not None and patches["binary"] is not None
    assert len(patches["tensors"]) * 10 <= len(new), (len(patches["tensors"]), len(new))
    for name, patch in patches.items():
        rebuilt = apply(patch, base, new)
        assert rebuilt == new, name
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    run = lambda b: ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa
    np.testing.assert_array_equal(run(apply(patches["tensors"], base, new)), run(new))


def test_a_full_finetune_xors_every_tensor_and_still_pays(models):
    base, new = models["v1"].read_bytes(), models["all"].read_bytes()
    patches = build_patches(base, new)
    assert apply(patches["tensors"], base, new) == new
    assert len(patches["tensors"]) < 0.9 * len(new)  # the XOR of a few SGD steps leaves the high bits zero


@st.composite
def edited(draw):
    """An old byte string and a new one made of pieces of it (moved, repeated), bit flips and new bytes."""
    old = draw(st.binary(min_size=0, max_size=4000) | st.just(bytes(range(256)) * 12))
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        if old and draw(st.booleans()):
            a = draw(st.integers(0, len(old) - 1))
            piece = bytearray(old[a:a + draw(st.integers(1, 1500))])
            for _ in range(draw(st.integers(0, 3))):
                piece[draw(st.integers(0, len(piece) - 1))] ^= 1 << draw(st.integers(0, 7))
            pieces.append(bytes(piece))
        else:
            pieces.append(draw(st.binary(min_size=1, max_size=500)))
    return old, b"".join(pieces)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=edited())
def test_any_old_and_new_bytes_round_trip_through_every_candidate(case):
    old, new = case
    if not old:
        old = b"\0"
    patches = build_patches(old, new)
    assert patches["tensors"] is None  # not ONNX
    assert apply(patches["binary"], old, new) == new


def test_the_delta_artifact_is_signed_for_its_base(models, key_dir, tmp_path):
    v1 = make_artifact(models["v1"], tmp_path / "a", key_dir, version=1)
    v2 = make_artifact(models["head"], tmp_path / "a", key_dir, version=2, chunk_size=1024)
    choice = delta_artifact(v2, v1, key_dir)
    assert choice.is_delta and choice.chosen in ("tensors", "binary")
    assert choice.artifact.dir.name.endswith("-v2-from-v1")
    art = load_artifact(choice.artifact.dir)
    m = art.manifest
    assert m.encoding == "delta" and m.delta == Delta(1, v1.manifest.raw_sha256, "ops")
    assert (m.raw_sha256, m.raw_length, m.version, m.golden) == (v2.manifest.raw_sha256, v2.manifest.raw_length, 2,
                                                                v2.manifest.golden)
    payload = art.model_path.read_bytes()
    assert art.model_path.name == "model.onnx.delta" and len(payload) == m.length and sha(payload) == m.sha256
    assert m.chunks == -(-len(payload) // 1024)
    key = load_public_key(key_dir / "signing.pub")
    assert Manifest.from_signed(verify_envelope(art.envelope, {keyid(key): key})) == m
    assert apply(payload, models["v1"].read_bytes(), models["head"].read_bytes()) == models["head"].read_bytes()
    report = choice.to_dict()
    assert report["bytes"] == len(payload) < report["full_bytes"] / 10 and report["ratio"] >= 10
    assert set(report["candidates"]) == {"tensors", "binary"}


def test_full_when_no_delta_saves_enough(models, key_dir, tmp_path, monkeypatch):
    v1 = make_artifact(models["other"], tmp_path / "a", key_dir, version=1)
    v2 = make_artifact(models["head"], tmp_path / "a", key_dir, version=2)
    choice = delta_artifact(v2, v1, key_dir)  # an unrelated base: whatever is chosen is no larger than full
    assert choice.artifact.size_bytes <= v2.size_bytes
    monkeypatch.setattr(bundle_delta, "MIN_GAIN", 0.99)
    choice = delta_artifact(v2, v1, key_dir)
    assert choice.chosen == "full" and choice.artifact is v2 and not choice.is_delta


def test_a_wave_is_grouped_by_the_version_each_device_runs(models, key_dir, tmp_path):
    arts = tmp_path / "artifacts"
    v1 = make_artifact(models["v1"], arts, key_dir, version=1)
    gone = make_artifact(models["other"], arts, key_dir, version=2)
    v3 = make_artifact(models["head"], arts, key_dir, version=3)
    store = FleetStore(tmp_path / "fleet.db")
    try:
        for art in (v1, gone):
            store.record(name="tiny", target="rpi4", version=art.version, sha256=art.sha256,
                         artifact=str(art.dir), kind="deploy", status="succeeded", reason=None, results=[])
        import shutil
        shutil.rmtree(gone.dir)
        store.ingest([("d1", "status", {"active_version": 1, "state": "activated"}),
                      ("d2", "status", {"active_version": 1, "state": "activated"}),
                      ("d3", "status", {"active_version": 2, "state": "activated"})])
        running = running_versions(store, ["d1", "d2", "d3", "d4"])
        assert running == {"d1": 1, "d2": 1, "d3": 2, "d4": None}
        groups = plan(v3, running, stored_bases(store, "rpi4"), key_dir)
    finally:
        store.close()
    by = {g.base_version: g for g in groups}
    assert by[1].devices == ["d1", "d2"] and by[1].is_delta and by[1].artifact.manifest.delta.base_version == 1
    assert by[2].artifact is v3 and "no stored artifact of v2" in by[2].why
    assert by[None].artifact is v3 and by[None].why == "version unknown"
    assert by[1].to_dict()["artifact"] == "delta" and by[None].to_dict()["artifact"] == "full"
