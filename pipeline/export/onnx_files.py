"""Passes over an ONNX file that change its bytes but not what it computes: onnxslim, and minifying names.

Apart from the backend so that the quantizers (:mod:`pipeline.export.quantize`), which the backend calls, can
use them too without an import cycle."""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import onnx

from ..errors import ExportError


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
