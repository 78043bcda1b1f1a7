"""The TFLite backend: PyTorch -> TFLite with litert-torch (the ``[tflite]`` extra): fp32, and full-integer int8 through PT2E
(per-channel symmetric weights, activations calibrated on the dataset, int8 input and output).

Input layout stays NCHW as in PyTorch, so golden vectors and benchmarks feed the same tensors as for
ONNX. litert-torch and its dependencies are imported only here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ExportError
from .backend import BACKENDS, ExportBackend

if TYPE_CHECKING:  # torch only where a PyTorch model is converted: running a .tflite file needs none
    import torch
    from torch import nn


def _litert():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import litert_torch
    except ImportError:
        raise ExportError("TFLite export needs the [tflite] extra: pip install 'edgefleet[tflite]' "
                          "(litert-torch, about 1.2 GB; `make test` installs it)") from None
    for name in ("absl", "jax", "litert_torch", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return litert_torch


def _convert(model: nn.Module, example: torch.Tensor, path: Path, quant_config=None) -> Path:
    from ..models.trace import locate

    litert_torch = _litert()
    path.parent.mkdir(parents=True, exist_ok=True)

    def run():
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            edge = litert_torch.convert(model, (example,), quant_config=quant_config)
            edge.export(str(path))

    _, layer, exc = locate(model, run)
    if exc is not None:
        where = f" at layer {layer!r}" if layer else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"TFLite conversion of {type(model).__name__} failed{where}: {first}")
    return path


def export_tflite(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int = 0) -> Path:
    """fp32 TFLite flatbuffer (``opset`` is an ONNX notion and is ignored)."""
    import torch

    return _convert(model.cpu().eval(), torch.zeros((1, *input_shape)), path)


def export_tflite_int8(model: nn.Module, input_shape: tuple[int, ...], path: Path, calibration: np.ndarray) -> Path:
    """Full-integer int8: PT2E static quantization calibrated on ``calibration``, then converted."""
    _litert()
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torch

    example = torch.zeros((1, *input_shape))
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.export.export(model.cpu().eval(), (example,)).module()
            prepared = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for i in range(len(calibration)):
                    prepared(torch.from_numpy(calibration[i:i + 1]))
            converted = convert_pt2e(prepared, fold_quantize=False)
    except Exception as exc:  # torch.export and PT2E raise many types
        raise ExportError(f"int8 quantization for TFLite failed: {str(exc).strip().splitlines()[0]}") from None
    return _convert(converted, example, path, QuantConfig(pt2e_quantizer=quantizer))


@BACKENDS.register("tflite")
class TFLiteBackend(ExportBackend):
    name, suffix, runtime = "tflite", ".tflite", "tflite"
    display, label = "TFLite", "the TFLite interpreter"
    quantizations = ("none", "int8-static")  # int8-static: full integer, int8 input and output
    default_atol = 1e-4
    #: the profile predicts latency from an ONNX graph of the same model and precision
    analysis_twin = "onnx"

    def export(self, model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int = 0) -> Path:
        return export_tflite(model, input_shape, path, opset)

    def quantize(self, kind: str, model: nn.Module, fp32: Path, dst: Path, calibration: np.ndarray,
                 input_shape: tuple[int, ...]) -> Path:
        if kind not in self.quantizations:
            raise ExportError(f"TFLite has no quantization {kind!r}; allowed: {list(self.quantizations)}")
        if kind == "none":
            return Path(shutil.copyfile(fp32, dst))
        return export_tflite_int8(model, input_shape, dst, calibration)

    def quantization_label(self, kind: str) -> str:
        return "int8 full-integer (TFLite)" if kind == "int8-static" else kind

    def run(self, path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
        from device_agent.runtimes import get_runtime

        session = get_runtime(self.runtime).load(path)
        name = session.inputs[0].name
        runs = [session.run({name: x[i:i + 1]}) for i in range(len(x))]
        return {o.name: np.concatenate([r[k] for r in runs]) for k, o in enumerate(session.outputs)}
