"""``pipeline rollback --to V`` signs V's model again under a new version: everything the device reads from the
manifest (golden vectors, budgets, the preprocessing spec, the class names, the drift reference) comes along."""

from __future__ import annotations

from conftest import make_artifact
from device_agent.drift import Reference
from device_agent.preprocess import Preprocess
from pipeline.ota.rollback import resign


def test_a_resigned_model_is_the_same_model_with_a_newer_version(tiny_onnx, key_dir, tmp_path):
    spec = Preprocess(channels=1, resize=(8, 8), scale=1 / 255)
    labels = tuple(f"class-{i}" for i in range(10))
    ref = Reference(50, 1, (0.4,), (0.2,), window=300)
    old = make_artifact(tiny_onnx, tmp_path / "artifacts", key_dir, version=5, preprocess=spec, labels=labels,
                        reference=ref)
    new = resign(old.dir, tmp_path / "work", key_dir, tmp_path / "artifacts")
    a, b = old.manifest, new.manifest
    assert b.version > a.version and b.raw_sha256 == a.raw_sha256
    assert (b.preprocess, b.labels, b.reference) == (spec, labels, ref)
    assert b.golden == a.golden and b.budgets == a.budgets and b.health == a.health
