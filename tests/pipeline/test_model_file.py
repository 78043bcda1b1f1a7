"""A model file the user brings: recognised, checked, described; transformed and checked against itself.

The files are made here the way users make theirs: ``torch.onnx.export`` with the batch dimension fixed at 1 (the
default) or dynamic, a model with two inputs, and files that are not models at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.config.sections import ExportConfig
from pipeline.data import Dataset
from pipeline.errors import ConfigError, ModelError
from pipeline.export.file_stage import file_stage
from pipeline.export.model_file import check_inputs, inspect_model_file
from pipeline.ui import UI


class Net(nn.Module):
    """Not one of ours: BatchNorm, a depthwise conv and a residual add, 3x12x12 input, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.dw(x)
        return self.head(x.mean((2, 3)))


class TwoInputs(nn.Module):
    def forward(self, a, b):
        return a + b


def _export(model: nn.Module, path: Path, dynamic: bool, example=None) -> Path:
    model.eval()
    example = example if example is not None else (torch.randn(1, 3, 12, 12),)
    kwargs = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dynamic else {}
    names = ["x"] if len(example) == 1 else ["a", "b"]
    torch.onnx.export(model, example, str(path), input_names=names, output_names=["y"], dynamo=False, **kwargs)
    return path


def _data(n_train: int = 64, n_test: int = 37, shape=(3, 12, 12), classes: int = 5) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset("mine", rng.standard_normal((n_train, *shape)).astype(np.float32),
                   rng.integers(0, classes, n_train), rng.standard_normal((n_test, *shape)).astype(np.float32),
                   rng.integers(0, classes, n_test), classes)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.train()
        net(torch.randn(64, 3, 12, 12))
    return {"fixed": _export(net, root / "fixed.onnx", dynamic=False),
            "dynamic": _export(net, root / "dynamic.onnx", dynamic=True),
            "two": _export(TwoInputs(), root / "two.onnx", True, (torch.zeros(1, 4), torch.zeros(1, 4)))}


@pytest.mark.parametrize("kind, batch", [("fixed", 1), ("dynamic", None)])
def test_a_file_is_described_by_the_runtime_that_will_run_it(files, kind, batch):
    mf = inspect_model_file(files[kind])
    assert (mf.format.name, mf.input_name, mf.outputs) == ("onnx", "x", ("y",))
    assert mf.batch == batch and mf.sample_shape == (3, 12, 12)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("quantize", ["none", "int8-static", "fp16"])
def test_every_transform_is_checked_against_the_original(files, kind, quantize, tmp_path):
    """Fixed batch 1 used to crash the accuracy check (it fed batches of 256); 37 test samples also leave a last
    batch that is not full for any fixed batch size above 1."""
    mf = inspect_model_file(files[kind])
    cfg = ExportConfig(format="onnx", quantize=quantize, calibration_samples=32, max_accuracy_drop=1.0)
    result = file_stage(mf, cfg, _data(), tmp_path / "out", UI(quiet=True), quantize)
    assert result.path.is_file() and result.format == "onnx"
    assert result.parity["samples"] == 37 and result.parity["max_abs_diff"] <= cfg.parity_atol
    assert result.parity["against"] == "the original model-original.onnx"
    if quantize == "none":
        assert result.quantization_report == {}
    else:
        q = result.quantization_report
        assert q["size_quantized_bytes"] != q["size_fp32_bytes"]
        assert q["sqnr_db"] > 10  # the same model, not another one
    assert inspect_model_file(result.path).input_shape == mf.input_shape  # still the user's interface


def test_a_tflite_file_cannot_be_requantized(files, tmp_path):
    """Refused before anything runs: the format's facts decide, not the file (an ONNX file stands in)."""
    mf = inspect_model_file(files["dynamic"])
    fake_tflite = type(mf)(mf.path, type(mf.format)("tflite", ".tflite", "tflite", ("none",), 1e-4, "x"),
                           mf.input_name, mf.input_shape, mf.input_dtype, mf.outputs)
    with pytest.raises(ConfigError, match="not available for a tflite file"):
        file_stage(fake_tflite, ExportConfig(format="onnx"), _data(), tmp_path, UI(quiet=True), "int8-static")


def test_data_of_another_shape_names_both_shapes(files):
    mf = inspect_model_file(files["fixed"])
    check_inputs(mf, (3, 12, 12), "deploy.yaml: data")
    with pytest.raises(ConfigError) as err:
        check_inputs(mf, (1, 8, 8), "deploy.yaml: data")
    assert "(1, 8, 8)" in str(err.value) and "(1, 3, 12, 12)" in str(err.value) and "deploy.yaml" in str(err.value)


def test_two_inputs_are_refused_by_name(files):
    with pytest.raises(ModelError, match=r"2 inputs \(a, b\)"):
        inspect_model_file(files["two"])


@pytest.mark.parametrize("content, says", [
    (b"", "empty"),
    (b"hello, I am a text file\n" * 10, "not an ONNX model"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "not an ONNX model"),
    (b"\x00\x00\x00\x00TFL3" + bytes(100), "cannot load"),  # the TFLite identifier on a body that is not one
])
def test_a_file_that_is_not_a_model_gets_one_clear_error(tmp_path, content, says):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=says) as err:
        inspect_model_file(path)
    assert str(path) in str(err.value)


def test_a_truncated_file_is_refused(files, tmp_path):
    data = files["dynamic"].read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=str(path)):
        inspect_model_file(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=2048))
def test_any_bytes_are_a_model_or_one_model_error(tmp_path, blob):
    path = tmp_path / "any.bin"
    path.write_bytes(blob)
    try:
        inspect_model_file(path)
    except ModelError as exc:
        assert str(path) in str(exc)
