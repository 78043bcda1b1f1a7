"""The ONNX backend: PyTorch -> ONNX (one self-contained file), onnxslim, the onnxruntime quantizers
(:mod:`pipeline.export.quantize`), run by onnxruntime with the reference int8 semantics."""

from __future__ import annotations

import io
import shutil
import warnings
from contextlib import redirect_stdout
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import ExportError
from .backend import BACKENDS, ExportBackend
from .onnx_files import minify, simplify

if TYPE_CHECKING:
    from torch import nn

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int = 17) -> Path:
    """TorchScript-based exporter: one file with weights inside, opset as asked, dynamic batch."""
    import torch

    from ..models.trace import locate

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


@BACKENDS.register("onnx")
class OnnxBackend(ExportBackend):
    name, suffix, runtime = "onnx", ".onnx", "onnxruntime"
    display, label = "ONNX", "onnxruntime"
    quantizations = ("none", "int8-static", "int8-dynamic", "fp16")
    default_atol = 1e-4

    def export(self, model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int = 17) -> Path:
        return export_onnx(model, input_shape, path, opset)

    def simplify(self, src: Path, dst: Path) -> Path | None:
        return simplify(src, dst)

    def quantize(self, kind: str, model: nn.Module, fp32: Path, dst: Path, calibration: np.ndarray,
                 input_shape: tuple[int, ...]) -> Path:
        from .quantize import QUANTIZERS

        fn = QUANTIZERS.get(kind)
        if fn is None:  # "none": the fp32 model, as shipped
            return minify(Path(shutil.copyfile(fp32, dst)))
        return minify(fn(fp32, dst, calibration))

    def run(self, path: Path, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        from .parity import ort_run, ort_session

        sess = ort_session(path)
        return dict(zip([o.name for o in sess.get_outputs()], ort_run(sess, x, batch_size)))
