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


def minify(path: Path) -> Path:
    """Strip what only tools read (value_info, node names, doc strings) and give internal tensors short
    names; inputs and outputs keep theirs. In place; a few percent of a small model's artifact."""
    model = onnx.load(str(path))
    g = model.graph
    keep = {v.name for v in [*g.input, *g.output]}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names):x}")

    del g.value_info[:]
    model.doc_string = ""
    for node in g.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for t in g.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    onnx.save(model, str(path))  # onnxruntime, which loads it next (parity, golden vectors), validates it
    return path


#: exporters whose heavy dependencies load only when asked for
_LAZY = {"tflite": "pipeline.export.tflite_export"}


def export_model(fmt: str, model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> Path:
    if fmt not in EXPORTERS and fmt in _LAZY:
        import importlib

        importlib.import_module(_LAZY[fmt])
    return EXPORTERS.get(fmt)(model, input_shape, path, opset)
