"""The export stage on its own: its section of deploy.yaml, a model and data in, checked files out."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import ExportConfig
from pipeline.export.stage import export_stage
from pipeline.ui import UI


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    y = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, SimpleNamespace(input_shape=(1, 8, 8), x_train=x, x_test=x, y_test=y)


@pytest.mark.parametrize("quantize", ["none", "int8-static"])
def test_onnx_export_stage(model_and_data, tmp_path, quantize):
    model, data = model_and_data
    result = export_stage(ExportConfig(quantize=quantize, max_accuracy_drop=0.1), model, data, tmp_path,
                          UI(quiet=True), quantize)
    assert result.path == tmp_path / "model.onnx" and result.format == "onnx"
    assert result.analysis_path == result.path and result.size_bytes == result.path.stat().st_size
    assert result.parity["max_abs_diff"] < 1e-4 and list(result.parity["outputs"]) == ["logits"]
    assert "simplified" in result.parity
    assert bool(result.quantization_report) == (quantize != "none")
    if quantize != "none":
        assert result.quantization_report["kind"] == "int8-static" and result.quantization_report["sqnr_db"] > 20


def test_tflite_export_stage_keeps_an_onnx_twin(model_and_data, tmp_path, tflite):
    model, data = model_and_data
    result = export_stage(ExportConfig(format="tflite", quantize="int8-static", max_accuracy_drop=0.1), model, data,
                          tmp_path, UI(quiet=True), "int8-static")
    assert result.path == tmp_path / "model.tflite" and result.analysis_path == tmp_path / "model.onnx"
    assert result.quantization_report["kind"] == "int8 full-integer (TFLite)"
    assert result.parity["max_abs_diff"] < 1e-4
