"""Static analysis of a TFLite flatbuffer, read through the interpreter itself (no delegate applied, so
the op list is the model's own): parameters, MACs per op, peak activation memory by liveness."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError
from .static import ANALYSERS, NodeCost, StaticProfile

_CATEGORY = {
    "CONV_2D": "conv", "DEPTHWISE_CONV_2D": "conv_dw", "FULLY_CONNECTED": "gemm", "BATCH_MATMUL": "gemm",
    "MAX_POOL_2D": "pool", "AVERAGE_POOL_2D": "pool", "MEAN": "pool",
    "QUANTIZE": "qdq", "DEQUANTIZE": "qdq",
    "ADD": "elementwise", "MUL": "elementwise", "SUB": "elementwise", "RELU": "elementwise", "RELU6": "elementwise",
    "LOGISTIC": "elementwise", "HARD_SWISH": "elementwise", "SOFTMAX": "elementwise",
    "RESHAPE": "shape", "TRANSPOSE": "shape", "SQUEEZE": "shape", "CONCATENATION": "shape", "PAD": "shape",
}
_WEIGHT_SLOTS = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2)}


def _interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        raise ModelError(f"{path}: analysing a TFLite model needs ai-edge-litert (the [tflite] extra)") from None
    try:
        it = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not a readable TFLite model ({str(exc).strip().splitlines()[0]})") from None
    return it


@ANALYSERS.register("tflite")
def analyse_tflite(path: Path) -> StaticProfile:
    it = _interpreter(path)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()  # the public API has no op list; this one is stable across LiteRT releases

    def nbytes(i: int) -> int:
        t = tensors[i]
        return int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize

    weights: set[int] = set()
    for op in ops:
        for slot in _WEIGHT_SLOTS.get(op["op_name"], ()):
            if slot < len(op["inputs"]) and op["inputs"][slot] >= 0:
                weights.add(op["inputs"][slot])
    const = {i for op in ops for i in op["inputs"] if i >= 0 and i in weights}
    params = nonzero = weight_bytes = 0
    for i in const:
        arr = it.get_tensor(i)
        params += arr.size
        nonzero += int(np.count_nonzero(arr))
        weight_bytes += arr.nbytes

    nodes, last_use, produced = [], {}, {}
    for idx, op in enumerate(ops):
        name, ins = op["op_name"], [i for i in op["inputs"] if i >= 0]
        for i in ins:
            last_use[i] = idx
        for o in op["outputs"]:
            produced[o] = idx
        out_elems = sum(int(np.prod(tensors[o]["shape"])) for o in op["outputs"])
        macs = 0
        if name in _WEIGHT_SLOTS and len(ins) > 1:
            w = tensors[op["inputs"][1]]["shape"]
            if name == "CONV_2D":
                macs = out_elems * int(np.prod(w[1:]))  # [cout, kh, kw, cin]
            elif name == "DEPTHWISE_CONV_2D":
                macs = out_elems * int(w[1] * w[2])  # [1, kh, kw, cout]
            else:
                macs = out_elems * int(w[-1])  # [cout, cin]
        act = sum(nbytes(i) for i in [*ins, *op["outputs"]] if i not in const)
        wb = sum(nbytes(i) for i in ins if i in const)
        nodes.append(NodeCost(f"{name}_{idx}", name, macs, wb, act, _CATEGORY.get(name, "other")))

    outputs = {d["index"] for d in it.get_output_details()}
    live = np.zeros(len(ops) + 1, dtype=np.int64)
    for i, t in tensors.items():
        if i in const or (i not in produced and i not in last_use):
            continue
        start = produced.get(i, 0)
        end = len(ops) if i in outputs else last_use.get(i, start)
        live[start:end + 1] += nbytes(i)
    quantized = any(np.dtype(tensors[i]["dtype"]) == np.int8 for i in const)
    return StaticProfile(params, nonzero, path.stat().st_size, weight_bytes, sum(n.macs for n in nodes),
                         int(live.max()) if len(ops) else 0, quantized, nodes)
