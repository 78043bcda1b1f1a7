"""`pipeline compress` as a user runs it: a structured recipe on a small ResNet, a real ONNX comparison."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow


def run(cfg, out, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "compress", "--config", str(cfg), "--out", str(out),
                           "--json", *extra], capture_output=True, text=True, timeout=600, cwd=cfg.parent)


@pytest.fixture
def cfg(tmp_path):
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["model"] = {"zoo": "resnet-small", "options": {"widths": [16, 32, 64], "blocks": 1},
                     "train": {"epochs": 3, "lr": 0.003, "batch_size": 64, "seed": 0}}
    data["data"] = {"name": "digits"}
    data["recipes"]["structured"] = [{"method": "structured", "macs_reduction": 2.5, "finetune_epochs": 2}]
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_structured_recipe_writes_a_smaller_faster_model(cfg, tmp_path):
    out = tmp_path / "out"
    proc = run(cfg, out, "--recipe", "structured")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mac_ratio"] >= 2.5 and report["params"] < report["params_before"]
    assert report["onnx"]["size_ratio"] > 2  # speed is measured in bench/compress.py, not asserted here
    assert report["onnx"]["speedup"] > 0 and report["onnx"]["latency_ms"]["compressed"] > 0
    assert report["accuracy_after"] > report["accuracy_before"] - 0.05
    assert {"compressed.pt", "dense.onnx", "compressed.onnx", "report.json"} <= {p.name for p in out.iterdir()}
    layers = {l["layer"]: l for l in report["layers"]}
    assert layers["layers.0.conv1"]["channels"] < 16  # channels really went, not just zeroed
    assert "Layers after compression" in proc.stderr and "channels kept" in proc.stderr
    assert report["weights_per_channel"] > 10 and "weights per output channel" not in proc.stderr
    assert json.loads((out / "report.json").read_text())["mac_ratio"] == report["mac_ratio"]

    # a failing run (unknown recipe) leaves the previous output as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run(cfg, out, "--recipe", "nope")
    assert proc.returncode == 2 and "unknown recipe 'nope'; deploy.yaml defines: default, lottery" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


THIN_NET = """
from torch import nn

def build(input_shape, num_classes):  # many channels, few weights each: 1x1, depthwise, grouped 1x1
    return nn.Sequential(nn.Conv2d(input_shape[0], 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                         nn.ReLU(), nn.Conv2d(32, 32, 1, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))
"""


def test_a_network_pruned_too_thin_is_warned_about(cfg, tmp_path):
    (tmp_path / "thinnet.py").write_text(THIN_NET)
    data = yaml.safe_load(cfg.read_text())
    data["model"] = {"factory": "thinnet:build", "train": {"epochs": 1}}
    data["recipes"]["thin"] = [{"method": "magnitude", "sparsity": 0.8, "finetune_epochs": 0}]
    cfg.write_text(yaml.safe_dump(data))
    proc = run(cfg, tmp_path / "out", "--recipe", "thin")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["weights_per_channel"] < 2 and report["single_weight_channels"] > 0.5
    assert f"keep {report['weights_per_channel']:g} weights per output channel" in proc.stderr


def test_interrupted_write_keeps_previous_output(cfg, tmp_path, monkeypatch):
    from pipeline.compress import stage as compress_stage
    from pipeline.config import load_deploy
    from pipeline.ui import UI

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    config = load_deploy(cfg)
    result = compress_stage.compress(config.view_compress(), UI(quiet=True), "lowrank")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.profile.compare.compare_latency", boom)
    with pytest.raises(KeyboardInterrupt):
        compress_stage.write_outputs(result, config.name, config.export.opset, out, UI(quiet=True))
    assert json.loads((out / "report.json").read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
