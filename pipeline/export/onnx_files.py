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

    drop_zero_points(model)
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


#: consumers whose DequantizeLinear inputs may lose an all-zero zero point and still fuse into the same integer
#: kernel in onnxruntime (QLinearConv: checked op for op on the optimized graph; its Gemm fusion needs the input)
_ZERO_POINT_OPTIONAL = frozenset({"Conv"})


def drop_zero_points(model: onnx.ModelProto) -> int:
    """Remove the all-zero zero-point initializers of the DequantizeLinear nodes that feed a convolution's
    weights and bias (the operator's default is zero, so the output is bit-identical): symmetric per-channel
    int8 weights carry one int8 per channel, their int32 biases one int32 per channel. In place; returns how
    many inputs it dropped (MobileNetV2's int8 file: 104, 2.4% of its bytes)."""
    from onnx import numpy_helper

    g = model.graph
    init = {t.name: t for t in g.initializer}
    consumers: dict[str, list[str]] = {}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
            uses[name] = uses.get(name, 0) + 1
    dropped, gone = 0, set()
    for node in g.node:
        if (node.op_type != "DequantizeLinear" or len(node.input) != 3 or node.input[0] not in init
                or node.input[2] not in init or not set(consumers.get(node.output[0], ["?"])) <= _ZERO_POINT_OPTIONAL):
            continue
        if numpy_helper.to_array(init[node.input[2]]).any():
            continue
        uses[node.input[2]] -= 1
        gone.add(node.input[2])
        del node.input[2]
        dropped += 1
    unused = {n for n in gone if uses[n] == 0} - {v.name for v in [*g.input, *g.output]}
    if unused:  # only the zero points no node reads any more (a subgraph's initializers are never touched)
        keep = [t for t in g.initializer if t.name not in unused]
        del g.initializer[:]
        g.initializer.extend(keep)
    return dropped


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
