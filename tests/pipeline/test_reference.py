"""The host's drift reference (pipeline.bundle.drift): computed by running a real exported model on real data
(scikit-learn's digits), equal to numpy's own statistics, signed into the manifest by the bundle stage, and
deploy.yaml's ``drift:`` block."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from device_agent.drift import DriftMonitor, Reference, Thresholds, events
from device_agent.manifest import Manifest, canonical_bytes
from pipeline.bundle import load_artifact
from pipeline.bundle.drift import ReferenceBuilder, channel_axis, drift_reference
from pipeline.bundle.stage import bundle_stage
from pipeline.config import dump_deploy, load_deploy, parse_deploy
from pipeline.errors import ConfigError
from pipeline.ui import UI

from conftest import REPO, make_artifact


@pytest.fixture(scope="module")
def digits():
    """digits as N x 1 x 8 x 8 in [0, 1], shuffled once: 900 to train on, 450 held out, 447 as live traffic."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    return SimpleNamespace(x=x, y=d.target[order], train=slice(0, 900), held=slice(900, 1350), live=slice(1350, None))


@pytest.fixture(scope="module")
def digits_model(digits, tmp_path_factory):
    """A small MLP trained on the 900 (seconds), exported to ONNX by the pipeline's own exporter."""
    import torch
    from torch import nn

    from pipeline.export import export_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, y = torch.from_numpy(digits.x[digits.train]), torch.from_numpy(digits.y[digits.train])
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return export_model("onnx", net.eval(), (1, 8, 8), tmp_path_factory.mktemp("digits") / "digits.onnx", 17)


def _session(path):
    from device_agent.runtimes import get_runtime

    return get_runtime("onnxruntime").load(path)


def test_the_reference_of_an_exported_model_is_numpys_statistics(digits, digits_model):
    x = digits.x[digits.held]
    ref, line = drift_reference(digits_model, x, samples=10_000, classes=10)
    assert ref is not None and ref.samples == len(x) and ref.channel_axis == 1 and ref.scores == "logits"
    assert "450 samples, 1 channel(s) on axis 1, 10 classes' shares and a 10-bin confidence histogram" in line
    np.testing.assert_allclose(ref.mean, [x.astype(np.float64).mean()], rtol=1e-5)
    np.testing.assert_allclose(ref.std, [x.astype(np.float64).std()], rtol=1e-5)
    sess = _session(digits_model)
    logits = sess.run({sess.inputs[0].name: x})[0].astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    conf = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
    np.testing.assert_allclose(ref.classes, np.bincount(logits.argmax(axis=1), minlength=10) / len(x), atol=1e-6)
    np.testing.assert_allclose(ref.confidence, np.histogram(conf, bins=10, range=(0, 1))[0] / len(x), atol=1e-6)
    assert Reference.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


def test_the_sample_is_bounded_and_seeded(digits, digits_model):
    a, _ = drift_reference(digits_model, digits.x, samples=300)
    b, _ = drift_reference(digits_model, digits.x, samples=300)
    c, _ = drift_reference(digits_model, digits.x, samples=300, seed=1)
    assert a == b and a.samples == 300 and c != a
    assert drift_reference(digits_model, digits.x, samples=0) == (None, "no drift reference (no reference samples)")
    ref, line = drift_reference(digits_model, digits.x, samples=100, classes=7)  # the data says 7 classes, not 10
    assert ref.scores is None and ref.classes is None and "not one score per class of 7" in line


def test_held_out_traffic_scores_low_and_shifted_traffic_raises_events(digits, digits_model):
    """The digits measured (window 300 of 447 live images, bootstrap seeds 0-5, reference of the 450 held out):
    in distribution PSI outputs 0.03-0.11, confidence 0.01-0.09, mean shift < 0.01; brightness +0.5 std: mean
    shift 0.49-0.50; only digits 0-4: PSI outputs 2.4-3.4; uniform noise images (another data set): PSI outputs
    6-7 and mean shift 0.51."""
    ref, _ = drift_reference(digits_model, digits.x[digits.held], classes=10)
    sess = _session(digits_model)
    name, live, labels = sess.inputs[0].name, digits.x[digits.live], digits.y[digits.live]
    t = Thresholds(min_samples=200)

    def scores(x):
        monitor = DriftMonitor(ref, window=300)
        for i in range(len(x)):
            assert monitor.observe(x[i:i + 1], sess.run({name: x[i:i + 1]}))
        return monitor.scores()

    def raised(x):
        return {e["score"] for e in events(scores(x), t)}

    for seed in range(3):
        rng = np.random.default_rng(seed)
        sample = live[rng.choice(len(live), 300)]
        assert raised(sample) == set()
        assert "mean_shift" in raised((sample + 0.5 * ref.std[0]).astype(np.float32))
        assert "psi_outputs" in raised(live[rng.choice(np.flatnonzero(labels < 5), 300)])
        assert {"psi_outputs", "mean_shift"} <= raised(rng.random((300, 1, 8, 8), dtype=np.float32))


def test_a_softmax_model_is_read_as_probabilities_and_nhwc_on_its_last_axis(tmp_path):
    import torch
    from torch import nn

    from pipeline.export import export_model

    class Nhwc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5 * 5 * 3, 5)

        def forward(self, x):
            return torch.softmax(self.fc(x.flatten(1)), dim=1)

    torch.manual_seed(1)
    path = export_model("onnx", Nhwc().eval(), (5, 5, 3), tmp_path / "nhwc.onnx", 17)
    x = np.random.default_rng(0).normal([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], size=(200, 5, 5, 3)).astype(np.float32)
    ref, _ = drift_reference(path, x, layout="NHWC", classes=5)
    assert ref.channel_axis == 3 and ref.scores == "probabilities"
    np.testing.assert_allclose(ref.mean, x.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(ref.std, x.astype(np.float64).std(axis=(0, 1, 2)), rtol=1e-5)
    assert drift_reference(path, x, classes=5)[0].channel_axis == 3  # no layout given: the axis of 3


@pytest.mark.parametrize("shape, layout, axis", [
    ((8, 3, 224, 224), None, 1), ((8, 224, 224, 3), None, 3), ((8, 3, 4, 3), None, 1), ((8, 3, 4, 3), "NHWC", 3),
    ((8, 64), None, 1), ((8, 16, 100), None, 1), ((8, 1, 2, 3, 4), None, 1), ((8,), None, None),
])
def test_channel_axis(shape, layout, axis):
    assert channel_axis(shape, layout) == axis


def test_the_builder_merges_batches_as_one():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(97, 2, 5, 5)).astype(np.float32)
    z = rng.normal(size=(97, 4)).astype(np.float32)
    whole, parts = ReferenceBuilder(1), ReferenceBuilder(1)
    whole.add(x, z)
    for i in range(0, 97, 10):
        parts.add(x[i:i + 10], z[i:i + 10])
    assert whole.reference() == parts.reference()
    z[3, 1] = np.nan  # a non-finite row is left out of the output statistics, counted
    flawed = ReferenceBuilder(1)
    flawed.add(x, z)
    assert flawed.dropped == 1 and sum(flawed.reference().classes) == pytest.approx(1)
    with pytest.raises(ValueError, match="NaN or infinity"):
        ReferenceBuilder(1).add(np.full((2, 2, 3, 3), np.inf, np.float32), z[:2])


# --------------------------------------------------------------------------- signed into the manifest

def test_the_bundle_signs_the_reference_into_the_manifest(digits, digits_model, tmp_path, key_dir):
    prof = SimpleNamespace(target="rpi4", budgets=[], predicted={})
    artifact = bundle_stage(digits_model, digits.x[digits.held], prof, UI(quiet=True), name="digits",
                            workdir=tmp_path, key_dir=key_dir, reference_data=digits.x[digits.held],
                            reference_samples=200, classes=10)
    stored = load_artifact(artifact.dir)
    signed = stored.envelope["signed"]
    assert signed["reference"]["samples"] == 200 and stored.manifest.reference == artifact.manifest.reference
    assert stored.manifest.reference == drift_reference(digits_model, digits.x[digits.held], samples=200,
                                                        classes=10)[0]
    none = bundle_stage(digits_model, digits.x[digits.held], prof, UI(quiet=True), name="digits", workdir=tmp_path,
                        key_dir=key_dir, reference_data=digits.x[digits.held], reference_samples=0)
    assert "reference" not in none.envelope["signed"] and none.manifest.reference is None


def test_a_manifest_round_trips_with_its_reference_and_stays_byte_identical_without(tiny_onnx, tmp_path, key_dir):
    ref = Reference(3, 1, (0.5,), (0.25,), "logits", tuple([0.1] * 10), (0.0, 0.5, 0.5))
    with_ref = make_artifact(tiny_onnx, tmp_path / "a", key_dir, 1, reference=ref)
    signed = with_ref.envelope["signed"]
    assert Manifest.from_signed(signed).reference == ref and signed["reference"] == ref.to_dict()
    assert canonical_bytes(Manifest.from_signed(signed).to_signed()) == canonical_bytes(signed)

    without = make_artifact(tiny_onnx, tmp_path / "b", key_dir, 2)
    body = without.envelope["signed"]
    assert "reference" not in body
    again = Manifest.from_signed(json.loads(json.dumps(body))).to_signed()
    assert canonical_bytes(again) == canonical_bytes(body)  # what an older host signed, a newer one rewrites same
    from pipeline.errors import ExportError

    wrong = Reference(3, 1, (0.5, 0.5), (0.25, 0.25))  # two channels for a one-channel input
    with pytest.raises(ExportError, match=r"the device would refuse this manifest: manifest: reference: 2 channel"):
        make_artifact(tiny_onnx, tmp_path / "c", key_dir, 3, reference=wrong)


# --------------------------------------------------------------------------- deploy.yaml's drift block

def test_the_drift_block_round_trips_and_defaults(tmp_path):
    base = yaml.safe_load((REPO / "deploy.yaml").read_text())
    cfg = load_deploy(REPO / "deploy.yaml")
    assert cfg.drift.reference_samples == 2000 and cfg.drift.reference_split == "test" and cfg.drift.window == 1000
    assert cfg.drift.thresholds() == Thresholds()
    base["drift"] = {"reference_samples": 500, "reference_split": "train", "window": 300, "psi_outputs": 0.1,
                     "psi_confidence": 0.2, "mean_shift": 0.5, "min_samples": 50}
    cfg = parse_deploy(base, "deploy.yaml", REPO)
    assert parse_deploy(dump_deploy(cfg), cfg.source, cfg.base_dir) == cfg
    assert dump_deploy(cfg)["drift"] == base["drift"]
    assert cfg.drift.thresholds() == Thresholds(0.1, 0.2, 0.5, 50)
    assert Thresholds.from_dict(cfg.drift.thresholds().to_dict()) == cfg.drift.thresholds()


@pytest.mark.parametrize("drift, expected", [
    ({"psi_outputs": 0}, "drift.psi_outputs: Input should be greater than 0"),
    ({"reference_split": "validation"}, "drift.reference_split"),
    ({"window": 0}, "drift.window"),
    ({"thresholds": {}}, "drift.thresholds: unknown key"),
])
def test_a_bad_drift_block_names_its_field(tmp_path, drift, expected):
    base = yaml.safe_load((REPO / "deploy.yaml").read_text())
    base["drift"] = drift
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError) as err:
        load_deploy(path)
    assert expected in str(err.value)
