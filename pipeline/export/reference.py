"""A dynamic-int8 model as float arithmetic on its integer values: what the target computes, on any host.

``quantize_dynamic`` writes the integer kernels into the graph itself (``ConvInteger``, ``MatMulInteger``
after ``DynamicQuantizeLinear``), so switching off onnxruntime's QDQ fusion does not help: on x86
without VNNI those kernels saturate. This rewrite replaces each by the float op on the same integers,
``Conv(float(x) - float(x_zp), float(w) - float(w_zp))``: int8 x uint8 products are exact in float32,
and so are their sums below 2**24 (ARM and VNNI accumulate in int32; the two agree up to float rounding of
larger sums). The output keeps its name and feeds the graph's own ``Cast`` and scale multiplication.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: integer op -> its float twin (inputs: a, b, a_zero_point, b_zero_point; attributes carried over)
FLOAT_TWIN = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}


def float_twin(model):
    """A copy of ``model`` with every ConvInteger / MatMulInteger computed in float32 on its integer values."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for i, node in enumerate(m.graph.node):
        if node.op_type not in FLOAT_TWIN:
            nodes.append(node)
            continue
        centred = []
        for k, name in enumerate(node.input[:2]):
            zp = node.input[k + 2] if len(node.input) > k + 2 else ""
            value, as_float = f"_ref{i}_{k}", f"_ref{i}_{k}_f"
            nodes.append(helper.make_node("Cast", [name], [as_float], to=TensorProto.FLOAT))
            if not zp:
                centred.append(as_float)
                continue
            zp_f = f"_ref{i}_{k}_zp"
            if k == 1 and node.op_type == "ConvInteger" and zp in inits:  # per output channel: [M] -> [M, 1, 1, ...]
                w = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
                z = numpy_helper.to_array(inits[zp]).astype(np.float32)
                rank = w.ndim if w is not None else 4
                m.graph.initializer.append(numpy_helper.from_array(z.reshape(-1, *[1] * (rank - 1)), zp_f))
            else:
                nodes.append(helper.make_node("Cast", [zp], [zp_f], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Sub", [as_float, zp_f], [value]))
            centred.append(value)
        nodes.append(helper.make_node(FLOAT_TWIN[node.op_type], centred, list(node.output),
                                      **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@contextlib.contextmanager
def reference_file(path: Path) -> Iterator[Path]:
    """``path`` itself when its graph names no integer kernel, else a float twin of it (while in the block)."""
    from device_agent.runtimes.onnxruntime_backend import integer_ops

    ops = integer_ops(path) if path.suffix == ".onnx" else []
    if not set(ops) & set(FLOAT_TWIN):
        yield path
        return
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        twin = Path(tmp) / path.name
        onnx.save(float_twin(onnx.load(str(path))), str(twin))
        yield twin
