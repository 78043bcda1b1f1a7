"""Static analysis of a model file: parameters, MACs per layer, peak activation memory by liveness.

One analyser per export format, registered by the format's name (ONNX here, TFLite in
``static_tflite``); :func:`analyse` picks it by the file's content."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import ModelError
from ..export.formats import format_of_file
from ..registry import Registry

_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT8: 1,
          onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8,
          onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.BOOL: 1}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


#: op categories, each with its own cost term in the predictor (pipeline.profile.predict):
#: conv: a dense convolution, lowered to a GEMM (im2col or indirect) whose reduction is cin x kh x kw;
#: conv_first: a dense convolution over few input channels (an image's first layer, cin <= FIRST_LAYER_CHANNELS):
#:   its reduction is short, so the GEMM's per-output work (bias, clamp, store) weighs more;
#: conv_dw: depthwise (one input channel per group): no reuse across output channels, load/bandwidth-bound;
#: conv_group: grouped with several channels per group: one small GEMM per group;
#: fused: an activation (Relu, Clip) that the runtime folds into the convolution or GEMM producing its input
#:   (ONNX Runtime's Conv/Gemm activation fusion, TFLite's fused_activation_function, XNNPACK's output clamp);
#: qdq_fused: a QuantizeLinear / DequantizeLinear an int8 runtime absorbs into the int8 kernel beside it (ONNX
#:   Runtime's QDQ node units, TFLite's int8 kernels): weights stay int8, int8 tensors pass between int8 kernels;
#: folded: nodes no runtime executes (Constant becomes an initializer, Identity and Dropout are removed at load).
CATEGORIES = ("conv", "conv_first", "conv_dw", "conv_group", "gemm", "pool", "elementwise", "fused", "qdq",
              "qdq_fused", "shape", "folded", "other")
_CATEGORY = {
    "Conv": "conv", "QLinearConv": "conv", "ConvInteger": "conv",
    "Gemm": "gemm", "MatMul": "gemm", "QLinearMatMul": "gemm", "MatMulInteger": "gemm",
    "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool", "GlobalMaxPool": "pool",
    "ReduceMean": "pool",
    "QuantizeLinear": "qdq", "DequantizeLinear": "qdq", "DynamicQuantizeLinear": "qdq",
    "Relu": "elementwise", "Clip": "elementwise", "Add": "elementwise", "Mul": "elementwise",
    "Sub": "elementwise", "Div": "elementwise", "Sigmoid": "elementwise", "HardSwish": "elementwise",
    "BatchNormalization": "elementwise", "Softmax": "elementwise", "Cast": "elementwise",
    "Flatten": "shape", "Reshape": "shape", "Transpose": "shape", "Squeeze": "shape", "Unsqueeze": "shape",
    "Concat": "shape", "Shape": "shape", "Gather": "shape",
    "Constant": "folded", "Identity": "folded", "Dropout": "folded",
}
#: input channels up to which a dense convolution counts as a first layer (gray, RGB, RGBA images)
FIRST_LAYER_CHANNELS = 4
_FUSABLE = {"Relu", "Clip"}  # activations every runtime we ship to fuses into the producing kernel
_FUSES_INTO = {"Conv", "QLinearConv", "ConvInteger", "Gemm"}
#: ops with int8 kernels between a DequantizeLinear and a QuantizeLinear (ONNX Runtime's QDQ selectors and
#: TFLite's int8 builtins both have them); Q/DQ around any other op run as kernels of their own
_INT8_KERNELS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool",
                 "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Sigmoid", "LeakyRelu", "Softmax",
                 "Resize", "Relu", "Clip"}


def conv_category(groups: int, in_per_group: int) -> str:
    """A convolution's category from its group count and input channels per group."""
    if groups > 1:
        return "conv_dw" if in_per_group == 1 else "conv_group"
    return "conv_first" if in_per_group <= FIRST_LAYER_CHANNELS else "conv"


def category(node: onnx.NodeProto, weight_shape: list[int] | None = None) -> str:
    """``weight_shape`` (out, in per group, kh, kw) refines a convolution; without it every grouped one is conv_dw
    and every dense one conv."""
    cat = _CATEGORY.get(node.op_type, "other")
    if cat != "conv":
        return cat
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    if not weight_shape or len(weight_shape) < 2:  # channels unknown: only the grouped / dense split
        return "conv_dw" if groups > 1 else "conv"
    return conv_category(groups, weight_shape[1])


@dataclass
class NodeCost:
    name: str
    op: str
    macs: int
    weight_bytes: int
    activation_bytes: int  # inputs read + outputs written, activations only
    category: str = "other"
    #: multiply-accumulates per output element (cin per group x kh x kw for a convolution, K for a GEMM);
    #: 0 where unknown or not a reduction
    reduction: int = 0
    #: bytes the runtime moves once it has absorbed the Q/DQ nodes of an int8 graph (int8 weights, int8 tensors
    #: between int8 kernels); None: weight_bytes + activation_bytes, which describe the graph as written
    run_bytes: int | None = None


@dataclass
class StaticProfile:
    params: int
    nonzero_params: int
    size_bytes: int
    weight_bytes: int
    macs: int
    peak_activation_bytes: int
    quantized: bool
    nodes: list[NodeCost] = field(default_factory=list)
    #: the weights a fully connected layer (Gemm, MatMul) reads, directly or through its DequantizeLinear: the
    #: runtime keeps them about once, where a convolution's are also kept prepacked (``Memory``)
    matmul_weight_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params, "nonzero_params": self.nonzero_params, "size_bytes": self.size_bytes,
            "weight_bytes": self.weight_bytes, "macs": self.macs, "peak_activation_bytes": self.peak_activation_bytes,
            "quantized": self.quantized,
            "layers": [{"name": n.name, "op": n.op, "macs": n.macs} for n in self.nodes if n.macs],
        }


def _shape(vi: onnx.ValueInfoProto) -> list[int]:
    dims = vi.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else 1 for d in dims]  # symbolic batch -> 1


def _nbytes(vi: onnx.ValueInfoProto) -> int:
    return int(np.prod(_shape(vi), dtype=np.int64)) * _BYTES.get(vi.type.tensor_type.elem_type, 4)


_RUNTIME_DOMAINS = {"com.microsoft"}  # onnxruntime's contrib ops: not in the ONNX standard, still runnable


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check a model file; a clear error for anything that is not a usable ONNX model."""
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    fmt = format_of_file(path)
    if fmt.name != "onnx":
        raise ModelError(f"{path}: a {fmt.name} model, not ONNX")
    try:
        model = onnx.load(str(path))
    except Exception:
        raise ModelError(f"{path}: neither an ONNX model nor a TFLite flatbuffer") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes); is it another kind of file?")
    opsets = {o.domain or "": o.version for o in model.opset_import}
    unknown = []
    for node in model.graph.node:
        domain = node.domain or ""
        if domain in _RUNTIME_DOMAINS:
            continue
        if not onnx.defs.has(node.op_type, domain):
            unknown.append(f"{node.op_type} (node {node.name or '?'}, domain {domain or 'ai.onnx'})")
    if unknown:
        raise ModelError(f"{path}: unknown operator(s) {unknown[:5]}; no ONNX runtime can run them "
                         f"(model opsets: {opsets})")
    try:
        return shape_inference.infer_shapes(model)
    except Exception as exc:
        raise ModelError(f"{path}: ONNX shape inference failed ({exc})") from None


def _qdq_as_run(g: onnx.GraphProto, values: dict[str, onnx.ValueInfoProto], inits: dict[str, onnx.TensorProto],
                constant: set[str]) -> tuple[set[int], list[int | None]]:
    """An int8 graph as an int8 runtime runs it: which Q/DQ nodes it absorbs (by index), and for each node the
    bytes it moves (0 for those absorbed; weights as stored, int8 where a tensor passes between int8 kernels).
    Q on a graph input, DQ onto a graph output or onto a float-only op stay kernels of their own."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def absorbed(n: onnx.NodeProto) -> bool:
        if n.op_type == "DequantizeLinear":
            if n.input[0] in constant:
                return True  # a weight or bias: the int8 kernel reads it as stored
            return n.output[0] not in graph_outputs and all(c.op_type in _INT8_KERNELS
                                                            for c in consumers.get(n.output[0], []))
        if n.op_type == "QuantizeLinear":
            src = producer.get(n.input[0])
            return src is not None and src.op_type in _INT8_KERNELS
        return False

    gone = {idx for idx, n in enumerate(g.node) if absorbed(n)}
    by_output = {n.output[0]: idx for idx, n in enumerate(g.node)}

    def wire(t: str, reading: bool) -> int:
        """bytes of tensor ``t`` as it moves: an absorbed DQ's int8 input, or an absorbed Q's int8 output"""
        if reading and by_output.get(t) in gone and producer[t].op_type == "DequantizeLinear":
            src = producer[t].input[0]
            return inits[src].ByteSize() if src in inits else _nbytes(values[src]) if src in values else 0
        if not reading and consumers.get(t) and all(c.op_type == "QuantizeLinear" and by_output[c.output[0]] in gone
                                                     for c in consumers[t]):
            q = consumers[t][0].output[0]
            return _nbytes(values[q]) if q in values else 0
        return _nbytes(values[t]) if t in values else 0

    run: list[int | None] = []
    for idx, n in enumerate(g.node):
        if idx in gone:
            run.append(0)
            continue
        weights = sum(inits[i].ByteSize() for i in n.input if i in inits)
        weights += sum(wire(i, True) for i in n.input if i in constant and by_output.get(i) in gone)
        acts = sum(wire(i, True) for i in n.input if i and i not in constant)
        run.append(weights + acts + sum(wire(o, False) for o in n.output if o not in constant))
    return gone, run


#: export format -> its static analyser (model file -> StaticProfile)
ANALYSERS: Registry[Callable[[Path], StaticProfile]] = Registry("static analysis for format")
#: analysers whose module (and runtime library) loads only when a file of their format comes
_LAZY = {"tflite": "pipeline.profile.static_tflite"}


def analyse(path: Path) -> StaticProfile:
    """Static profile of a model file of any export format (recognised by content, not by name)."""
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    fmt = format_of_file(path).name
    if fmt not in ANALYSERS and fmt in _LAZY:
        importlib.import_module(_LAZY[fmt])
    return ANALYSERS.get(fmt)(path)


_MATMUL_OPS = frozenset({"Gemm", "MatMul", "QLinearMatMul", "MatMulInteger", "QGemm"})


@ANALYSERS.register("onnx")
def analyse_onnx(path: Path) -> StaticProfile:
    """Static profile of an ONNX model."""
    model = load_onnx(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    values = {vi.name: vi for vi in [*g.input, *g.output, *g.value_info]}
    # tensors computed only from constants (e.g. DequantizeLinear of a weight) are weights, not activations
    constant = set(inits)
    for node in g.node:
        if node.op_type == "Constant" or (node.input and all(i in constant or not i for i in node.input)):
            constant.update(node.output)

    # quantization parameters (scales, zero points) are not weights of the network
    qparams = {i for node in g.node if node.op_type in ("QuantizeLinear", "DequantizeLinear") for i in node.input[1:]}
    params = nonzero = weight_bytes = 0
    for t in inits.values():
        arr = numpy_helper.to_array(t)
        if arr.ndim >= 1 and arr.size > 1 and t.name not in qparams:  # skip scalars and shapes
            params += arr.size
            nonzero += int(np.count_nonzero(arr))
        weight_bytes += arr.nbytes

    quantized = any(node.op_type in _QUANT_OPS for node in g.node)
    qdq_gone, run_bytes = _qdq_as_run(g, values, inits, constant) if quantized else (set(), [None] * len(g.node))
    consumers: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    producer_op: dict[str, str] = {}
    nodes, last_use, produced_at = [], {}, {}
    for idx, node in enumerate(g.node):
        for i in node.input:
            last_use[i] = idx
        for o in node.output:
            produced_at[o] = idx
            producer_op[o] = node.op_type
        macs = reduction = 0
        w_shape: list[int] = []
        if node.op_type in ("Conv", "QLinearConv", "ConvInteger") and node.output[0] in values:
            w_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            w_shape = _shape(values[w_name]) if w_name in values else list(inits[w_name].dims) if w_name in inits else []
            if w_shape:
                reduction = int(np.prod(w_shape[1:]))
                macs = int(np.prod(_shape(values[node.output[0]]))) * reduction
        elif node.op_type in ("Gemm", "MatMul", "QLinearMatMul", "MatMulInteger") and node.output[0] in values:
            a = node.input[0]
            reduction = _shape(values[a])[-1] if a in values else 0
            macs = int(np.prod(_shape(values[node.output[0]]))) * reduction
        act = sum(_nbytes(values[t]) for t in [*node.input, *node.output] if t in values and t not in constant)
        wbytes = sum(inits[t].ByteSize() for t in node.input if t in inits)
        cat = category(node, w_shape)
        if (node.op_type in _FUSABLE and node.input and producer_op.get(node.input[0]) in _FUSES_INTO
                and consumers.get(node.input[0]) == 1):
            cat = "fused"
        if idx in qdq_gone:
            cat = "qdq_fused"
        nodes.append(NodeCost(node.name or f"{node.op_type}_{idx}", node.op_type, macs, wbytes, act, cat, reduction,
                              run_bytes[idx]))

    # liveness: an activation lives from its producer (graph inputs: step 0) to its last consumer
    graph_outputs = {o.name for o in g.output}
    n = len(g.node)
    live = np.zeros(n + 1, dtype=np.int64)
    for name, vi in values.items():
        if name in constant:
            continue
        start = produced_at.get(name, 0)
        end = n if name in graph_outputs else last_use.get(name, start)
        live[start:end + 1] += _nbytes(vi)
    matmul_inputs = {i for node in g.node if node.op_type in _MATMUL_OPS for i in node.input}
    matmul_inputs |= {node.input[0] for node in g.node if node.op_type == "DequantizeLinear"
                      and node.output[0] in matmul_inputs}
    matmul_bytes = sum(numpy_helper.to_array(inits[t]).nbytes for t in matmul_inputs if t in inits and t not in qparams)
    return StaticProfile(params, nonzero, path.stat().st_size, weight_bytes, sum(c.macs for c in nodes),
                         int(live.max()) if n else 0, quantized, nodes, matmul_bytes)
