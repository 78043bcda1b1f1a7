"""``pipeline deploy --model FILE``: a model file the user exported elsewhere, shipped to local agents over a real
Mosquitto with PyTorch unimportable in the deploying process (the file path never needs it).

The files are made here with a fresh architecture (BatchNorm, a depthwise conv, a residual add), exported the
way users do: ONNX with the batch dimension fixed at 1, and TFLite through the project's own converter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import require, small_deploy_config

pytestmark = pytest.mark.slow

#: torch refused in the deploying process: any attempt to import it fails the command and is reported
RUNNER = """
import atexit, importlib.abc, json, sys
tried = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "torch_pruning", "litert_torch"):
            tried.append(name)
            raise ImportError(name + " is blocked by this test")
        return None

sys.meta_path.insert(0, Refuse())
atexit.register(lambda: sys.stderr.write("\\nBLOCKED-TRIED " + json.dumps(sorted(set(tried))) + "\\n"))
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Fresh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.dw(x)).mean((2, 3)))


def _onnx(path: Path) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(Fresh().eval(), (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"],
                      output_names=["scores"], dynamo=False)  # batch fixed at 1, as exported by default
    return path


def _deploy(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, "deploy", "--target", "rpi4", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    tried = json.loads(proc.stderr.rsplit("BLOCKED-TRIED ", 1)[1].splitlines()[0])
    return proc, tried


def test_an_onnx_file_is_quantized_and_delivered_without_torch(tmp_path):
    cfg = small_deploy_config(tmp_path, local_agents=2, local_broker="mosquitto")
    model = _onnx(tmp_path / "mine.onnx")
    report = tmp_path / "report.json"
    proc, tried = _deploy(tmp_path, "--config", str(cfg), "--model", str(model), "--quantize", "int8-static",
                          "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tried == []  # nothing even tried to import torch
    r = json.loads(report.read_text())
    assert r["model"]["file"]["input_shape"] == [1, 1, 8, 8] and r["model"]["file"]["outputs"] == ["scores"]
    assert r["export"]["quantization"]["kind"] == "int8-static"
    assert r["export"]["parity"]["against"] == "the original model-original.onnx"
    assert [d["status"] for d in r["delivery"]] == ["activated", "activated"]
    assert {d["active_version"] for d in r["delivery"]} == {r["artifact"]["version"]}
    assert "compress/fit: skipped" in proc.stderr  # deploy.yaml's recipe is not silently applied to a file
    assert "class_mismatch" not in r  # 10 scores, 10 classes


def test_a_class_count_mismatch_is_reported_not_silent(tmp_path):
    cfg = small_deploy_config(tmp_path, local_agents=1, local_broker="mosquitto")
    torch.manual_seed(0)
    net = Fresh()
    net.head = nn.Linear(8, 1000)  # an ImageNet-style head on 10-class data
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 8, 8),), str(tmp_path / "wide.onnx"), dynamo=False)
    proc, _ = _deploy(tmp_path, "--config", str(cfg), "--model", str(tmp_path / "wide.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["class_mismatch"] == {"model": 1000, "data": 10}
    assert "scores 1000 classes, the data has 10" in proc.stderr


NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _image_folder(root: Path) -> Path:
    """digits as the user's own PNGs, one folder per class named in words, at 16x16 (resized to 8x8 on load)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:300], digits.target[:300])):
        d = root / NAMES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8")).resize((16, 16)).save(d / f"{i}.png")
    return root


def test_model_file_in_deploy_yaml_with_an_image_folder_ships_its_class_names(tmp_path):
    cfg = small_deploy_config(tmp_path, local_agents=1, local_broker="mosquitto")
    data = yaml.safe_load(cfg.read_text())
    data["model"] = {"file": "mine.onnx"}  # relative to deploy.yaml
    data["data"] = {"name": "folder", "path": str(_image_folder(tmp_path / "photos")), "test_fraction": 0.2,
                    "preprocess": {"channels": 1, "resize": [8, 8], "scale": 1 / 255}}
    cfg.write_text(yaml.safe_dump(data))
    _onnx(tmp_path / "mine.onnx")
    proc, tried = _deploy(tmp_path, "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tried == []
    r = json.loads(proc.stdout)
    assert r["model"]["file"]["path"] == str(tmp_path / "mine.onnx")
    assert r["delivery"][0]["status"] == "activated"
    # the class names, in label order (sorted folder names), are signed into the manifest the device installed
    installed = [json.loads(p.read_text())["signed"] for p in tmp_path.rglob("slots/*/manifest.json")]
    assert installed and all(m["labels"] == sorted(NAMES) for m in installed)
    assert installed[0]["preprocess"]["resize"] == [8, 8]


def test_a_file_that_is_not_a_model_and_data_that_does_not_fit_get_one_error_each(tmp_path):
    cfg = small_deploy_config(tmp_path, local_agents=1)
    (tmp_path / "notes.onnx").write_text("these are my notes, not a model\n")
    proc, _ = _deploy(tmp_path, "--config", str(cfg), "--model", str(tmp_path / "notes.onnx"))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "notes.onnx" in errors[0] and "not an ONNX model" in errors[0], proc.stderr

    data = yaml.safe_load(cfg.read_text())
    data["data"] = {"name": "mnist-5k", "train_size": 200, "test_size": 100}  # 1x28x28 samples for an 8x8 model
    cfg.write_text(yaml.safe_dump(data))
    proc, _ = _deploy(tmp_path, "--config", str(cfg), "--model", str(_onnx(tmp_path / "mine.onnx")))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "(1, 28, 28)" in proc.stderr and "(1, 1, 8, 8)" in proc.stderr


def test_a_tflite_file_is_delivered_to_the_tflite_runtime(tmp_path):
    require(_has_litert(), "litert-torch (the [tflite] extra)")
    from pipeline.export.tflite_backend import export_tflite

    torch.manual_seed(0)
    model = export_tflite(Fresh().eval(), (1, 8, 8), tmp_path / "mine.tflite")
    cfg = small_deploy_config(tmp_path, local_agents=1, local_broker="mosquitto")
    proc, tried = _deploy(tmp_path, "--config", str(cfg), "--model", str(model), "--quantize", "none", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tried == []
    r = json.loads(proc.stdout)
    assert r["model"]["file"]["format"] == "tflite" and r["delivery"][0]["status"] == "activated"


def _has_litert() -> bool:
    import importlib.util

    return importlib.util.find_spec("litert_torch") is not None

