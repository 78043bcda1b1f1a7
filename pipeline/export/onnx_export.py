"""PyTorch -> ONNX, one self-contained file."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import onnx
import torch
from torch import nn

from ..trace import locate
from ..errors import ExportError
from ..registry import Registry

Exporter = Callable[[nn.Module, tuple[int, ...], Path, int], Path]
EXPORTERS: Registry[Exporter] = Registry("export format")

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@EXPORTERS.register("onnx")
def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int = 17) -> Path:
    """TorchScript-based exporter: one file with weights inside, opset as asked, dynamic batch."""
    model = model.cpu().eval()
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    def run() -> None:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (dummy,), str(path), opset_version=opset, dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        onnx.checker.check_model(str(path))

    _, layer, exc = locate(model, run)
    if exc is not None:  # the exporters raise many unrelated types
        where = f" at layer {layer!r}" if layer else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of {type(model).__name__} failed{where}: {first}")
    return path


def simplify(src: Path, dst: Path) -> Path:
    """onnxslim: constant folding, dead-node removal and op fusion; the caller checks parity after it."""
    import onnxslim

    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = onnxslim.slim(str(src))
        onnx.save(model, str(dst))
        onnx.checker.check_model(str(dst))
    except Exception as exc:
        raise ExportError(f"onnxslim could not simplify {src.name}: {exc}") from None
    return dst


def export_model(fmt: str, model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> Path:
    return EXPORTERS.get(fmt)(model, input_shape, path, opset)
