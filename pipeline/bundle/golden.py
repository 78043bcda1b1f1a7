"""Golden vectors: what the *target* computes for a few inputs, and how far a device may legitimately differ.

The outputs come from the model's own semantics, not from this host's integer kernels: a QDQ model is
run with onnxruntime's QDQ fusion switched off (fake-quant, the same numbers on every CPU; see
:mod:`device_agent.runtimes.onnxruntime_backend`). A device's integer kernels compute the same graph
with exact int32 accumulation and their own requantization rounding, so any of its requantized
activations may land on the neighbouring level of a value this host computed. The tolerance for a
quantized model is derived from exactly that: the host re-runs the golden inputs with *every*
``QuantizeLinear`` pushed half a step up (and, separately, down), i.e. each activation moved to its
neighbouring level, and takes the largest output deviation, plus one step of the output's own scale.
That bounds kernel-family differences while staying far below what a wrong model produces (a broken
model misses by many output steps: on the demo model the tolerance is 4 output steps, 0.8 on logits
spanning -27..22, while this model on a saturating AVX2 CPU misses by 4.6 with the same classes).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.manifest import encode_tensor

log = logging.getLogger(__name__)

#: half a quantization step: each requantized activation moves to a neighbouring level
PROBE_STEP = 0.5


def reference_session(runtime, model_path: Path):
    """``model_path`` loaded with the runtime's reference int8 semantics where it has them (a dynamic-int8
    ONNX graph as its float twin, :mod:`pipeline.export.reference`), else with its plain loader."""
    from ..export.reference import reference_file

    with reference_file(model_path) as path:
        return getattr(runtime, "load_reference", runtime.load)(path)


def golden_section(runtime, model_path: Path, x: np.ndarray) -> dict[str, Any]:
    """The manifest's ``golden`` section for ``model_path`` on inputs ``x`` (one case per row)."""
    sess = reference_session(runtime, model_path)
    input_name = sess.inputs[0].name
    cases, outputs, peak = [], [], 0.0
    for i in range(len(x)):
        inp = x[i:i + 1].astype(np.float32)
        outs = sess.run({input_name: inp})
        outputs.append(outs)
        peak = max([peak, *(float(np.max(np.abs(o))) for o in outs)])
        cases.append({"inputs": {input_name: encode_tensor(inp)}, "outputs": [encode_tensor(o) for o in outs]})
    section: dict[str, Any] = {"cases": cases, "atol": max(1e-4, 1e-3 * peak), "rtol": 1e-3,
                               "semantics": "reference"}
    quant = quantized_tolerance(model_path, x, outputs) if model_path.suffix == ".onnx" else None
    if quant:
        section["quantized"] = quant
    return section


def output_scales(model) -> list[float | None]:
    """The quantization step of each graph output produced by a DequantizeLinear with a constant scale."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == n.attribute[0].TENSOR}
    producer = {o: n for n in model.graph.node for o in n.output}
    scales: list[float | None] = []
    for out in model.graph.output:
        node = producer.get(out.name)
        scale = None
        if node is not None and node.op_type == "DequantizeLinear":
            value = inits.get(node.input[1], consts.get(node.input[1]))
            scale = None if value is None else float(np.max(np.abs(value)))
        scales.append(scale)
    return scales


def shifted_model(model, step: float):
    """A copy of ``model`` whose every per-tensor QuantizeLinear sees its input moved by ``step`` of its own
    scale (a per-axis scale would need the axis's broadcast; static quantization makes activations per-tensor)."""
    import copy

    from onnx import helper

    m = copy.deepcopy(model)
    per_axis = {t.name for t in m.graph.initializer if np.prod(t.dims, dtype=np.int64) > 1}
    nodes = []
    for i, node in enumerate(m.graph.node):
        if node.op_type == "QuantizeLinear" and node.input[1] not in per_axis:
            x, scale = node.input[0], node.input[1]
            delta, moved = f"_probe_delta_{i}", f"_probe_in_{i}"
            step_name = f"_probe_step_{i}"
            nodes.append(helper.make_node("Constant", [], [step_name], value_float=step))
            nodes.append(helper.make_node("Mul", [scale, step_name], [delta]))
            nodes.append(helper.make_node("Add", [x, delta], [moved]))
            node.input[0] = moved
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def quantized_tolerance(model_path: Path, x: np.ndarray, reference: list[list[np.ndarray]]) -> dict[str, Any] | None:
    """Per output: the probe's deviation (every activation one level off) plus one output step; None for a
    model without QuantizeLinear nodes."""
    import onnx

    from device_agent.runtimes.onnxruntime_backend import OnnxRuntime

    model = onnx.load(str(model_path))
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return None
    scales = output_scales(model)
    deviation = [0.0] * len(scales)
    with tempfile.TemporaryDirectory() as tmp:
        for step in (PROBE_STEP, -PROBE_STEP):
            path = Path(tmp) / f"probe{step:+}.onnx"
            onnx.save(shifted_model(model, step), str(path))
            sess = OnnxRuntime().load_reference(path)
            name = sess.inputs[0].name
            for i, ref in enumerate(reference):
                got = sess.run({name: x[i:i + 1].astype(np.float32)})
                for j, (g, r) in enumerate(zip(got, ref)):
                    deviation[j] = max(deviation[j], float(np.max(np.abs(g.astype(np.float64) - r))))
    atol = [d + (s or 0.0) for d, s in zip(deviation, scales)]
    log.debug("golden tolerance of %s: %s (output scales %s)", model_path.name, atol, scales)
    return {"atol": atol, "output_scales": scales, "probe_step": PROBE_STEP,
            "basis": "every QuantizeLinear moved half a step up and down, plus one output step"}
