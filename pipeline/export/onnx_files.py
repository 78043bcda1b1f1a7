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


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's nodes in an order where each comes after the producers of its inputs, as the ONNX checker
    requires (onnxruntime's float16 converter appends its input casts at the end). In place; a cycle or an input
    nothing produces leaves those nodes last, in their order, for the checker to name."""
    g = model.graph
    ready = {v.name for v in [*g.input, *g.initializer]} | {""}
    ready |= {t.name for t in g.sparse_initializer}
    pending, ordered = list(g.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            ordered += rest
            break
        ordered += done
        ready |= {o for n in done for o in n.output}
        pending = rest
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]  # copies: the originals go
    del g.node[:]
    g.node.extend(nodes)
    return model
