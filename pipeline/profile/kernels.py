"""Kernel-level latency prediction for a device that was calibrated in person (nn-Meter's approach).

A model runs as a sequence of kernels: a convolution with its BatchNorm and activation fused in,
a depthwise convolution, a fully connected layer, a pooling, a residual add. Each kernel's latency
on the device is learnt from isolated single-kernel models measured there (``pipeline targets
calibrate``), by a random forest over its configuration (channels, kernel size, stride, spatial
size, MACs, bytes); a model's latency is the session's fixed cost plus the sum over its kernels.
The measured samples are stored as data (``targets/<name>.kernels.json``); the forests are fitted
when loaded, so nothing pickled is ever loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .static import load_onnx

KINDS = ("conv", "dwconv", "gemm", "pool", "gpool", "add")
_FUSED = {"Relu", "Clip", "BatchNormalization", "HardSwish", "Sigmoid"}


@dataclass(frozen=True)
class Kernel:
    kind: str
    int8: bool
    cin: int
    cout: int
    k: int
    stride: int
    h: int  # input spatial size
    w: int

    @property
    def macs(self) -> int:
        ho, wo = -(-self.h // self.stride), -(-self.w // self.stride)
        if self.kind == "conv":
            return self.cout * ho * wo * self.cin * self.k * self.k
        if self.kind == "dwconv":
            return self.cout * ho * wo * self.k * self.k
        if self.kind == "gemm":
            return self.cin * self.cout
        return self.cin * self.h * self.w

    def features(self) -> list[float]:
        ho, wo = -(-self.h // self.stride), -(-self.w // self.stride)
        # besides sizes: output pixels and the im2col row (cin x k x k) drive int8 kernels with few input
        # channels (a network's first layer), which are im2col-bound rather than MAC-bound
        return [self.cin, self.cout, self.k, self.stride, self.h, self.w, np.log1p(self.macs),
                np.log1p(self.cin * self.h * self.w), np.log1p(self.cout * ho * wo),
                self.cin % 16, self.cout % 16, np.log1p(ho * wo), self.cin * self.k * self.k,
                np.log1p(self.cout)]

    @property
    def work(self) -> float:
        """What the kernel's time grows with: its MACs and its output elements (compute kernels), the elements
        it reads (pooling, adds). The forests learn the time per unit of work, which stays bounded beyond the
        sizes a calibration timed, so a kernel larger than any of them is priced by its work, not capped at the
        largest one measured."""
        ho, wo = -(-self.h // self.stride), -(-self.w // self.stride)
        if self.kind in ("conv", "dwconv", "gemm"):
            return float(self.macs + 16 * self.cout * ho * wo)
        return float(self.cin * self.h * self.w)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "int8": self.int8, "cin": self.cin, "cout": self.cout, "k": self.k,
                "stride": self.stride, "h": self.h, "w": self.w}


def _shape(values: dict[str, onnx.ValueInfoProto], name: str) -> list[int]:
    vi = values.get(name)
    if vi is None:
        return []
    return [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]


def qdq_kilo_elements(path: Path) -> float:
    """Thousands of activation elements that pass through Quantize/DequantizeLinear nodes left in the graph
    (around ops that have no int8 kernel, and at the model's edges): their cost is not in any kernel."""
    model = load_onnx(path)
    g = model.graph
    values = {vi.name: vi for vi in [*g.input, *g.output, *g.value_info]}
    inits = {t.name for t in g.initializer}
    total = 0
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in inits:
            total += int(np.prod(_shape(values, node.input[0]) or [0]))
    return total / 1e3


def kernels_of(path: Path) -> list[Kernel]:
    """The kernels onnxruntime will run for a model, from its exported graph (BN and activations fused
    into the convolution or GEMM before them, Q/DQ pairs folded into int8 kernels, shape ops free)."""
    model = load_onnx(path)
    g = model.graph
    values = {vi.name: vi for vi in [*g.input, *g.output, *g.value_info]}
    inits = {t.name: list(t.dims) for t in g.initializer}
    int8 = any(n.op_type == "DequantizeLinear" for n in g.node)
    producer = {o: n for n in g.node for o in n.output}

    def source(name: str) -> str:  # look through a DequantizeLinear to the tensor behind it
        n = producer.get(name)
        return n.input[0] if n is not None and n.op_type == "DequantizeLinear" else name

    out = []
    for node in g.node:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Conv":
            w = inits.get(source(node.input[1])) or _shape(values, node.input[1])
            x = _shape(values, node.input[0])
            if len(w) != 4 or len(x) != 4:
                continue
            group = int(attrs.get("group", 1))
            stride = int(attrs.get("strides", [1])[0])
            kind = "dwconv" if group > 1 else "conv"
            # kernels are sampled with "same" padding: a convolution without it computes the outputs of one
            # on the input size that gives its output size
            pads = list(attrs.get("pads", [0, 0, 0, 0])) or [0, 0, 0, 0]
            ho = (x[2] + pads[0] + pads[2] - w[2]) // stride + 1
            wo = (x[3] + pads[1] + pads[3] - w[3]) // stride + 1
            h, wd = (x[2], x[3]) if -(-x[2] // stride) == ho and -(-x[3] // stride) == wo else (ho * stride, wo * stride)
            out.append(Kernel(kind, int8, x[1], w[0], w[2], stride, h, wd))
        elif op in ("Gemm", "MatMul"):
            w = inits.get(source(node.input[1])) or _shape(values, node.input[1])
            if len(w) != 2:
                continue
            trans = int(attrs.get("transB", 0)) if op == "Gemm" else 0
            cout, cin = (w[0], w[1]) if trans else (w[1], w[0])
            out.append(Kernel("gemm", int8, cin, cout, 1, 1, 1, 1))
        elif op in ("MaxPool", "AveragePool"):
            x = _shape(values, node.input[0])
            k = int(attrs.get("kernel_shape", [2])[0])
            out.append(Kernel("pool", int8, x[1], x[1], k, int(attrs.get("strides", [k])[0]), x[2], x[3]))
        elif op in ("GlobalAveragePool", "ReduceMean"):
            x = _shape(values, node.input[0])
            if len(x) == 4:
                out.append(Kernel("gpool", int8, x[1], x[1], 1, 1, x[2], x[3]))
        elif op == "Add" and all(i not in inits and producer.get(i) is not None for i in node.input):
            x = _shape(values, node.input[0])
            if len(x) == 4:
                out.append(Kernel("add", int8, x[1], x[1], 1, 1, x[2], x[3]))
    return out


class KernelPredictor:
    """Random forests per (kind, int8), fitted on measured samples; predicts microseconds."""

    def __init__(self, samples: list[dict[str, Any]], correction: dict[str, list[float]] | None = None) -> None:
        from sklearn.ensemble import RandomForestRegressor

        #: per precision, model latency = a + sum over kinds of b_kind x (kernel predictions of that kind)
        #: + c x (thousands of elements through activation Q/DQ), fitted on whole models:
        #: [a, b_conv, b_dwconv, ..., c] in KINDS order
        self.correction = correction or {p: [0.0] + [1.0] * len(KINDS) + [0.0] for p in ("fp32", "int8")}
        #: the speed reference's latency when calibrated (see profile.compare.SpeedProbe)
        self.reference_ms: float | None = None
        #: how and where it was calibrated (``pipeline targets calibrate``: the devices, their versions, the date,
        #: the fit's error); empty for measurements that predate provenance
        self.meta: dict[str, Any] = {}
        self.samples = samples
        self.forests: dict[tuple[str, bool], Any] = {}
        groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for s in samples:
            groups.setdefault((s["kernel"]["kind"], s["kernel"]["int8"]), []).append(s)
        for key, rows in groups.items():
            kernels = [Kernel(**r["kernel"]) for r in rows]
            x = np.array([k.features() for k in kernels])
            y = np.log(np.array([max(r["us"], 0.05) for r in rows]) / np.array([max(k.work, 1.0) for k in kernels]))
            forest = RandomForestRegressor(n_estimators=120, min_samples_leaf=2, random_state=0, n_jobs=1)
            self.forests[key] = forest.fit(x, y)

    def kernel_us(self, kernels: list[Kernel]) -> np.ndarray:
        out = np.zeros(len(kernels))
        for key in {(k.kind, k.int8) for k in kernels}:
            idx = [i for i, k in enumerate(kernels) if (k.kind, k.int8) == key]
            forest = self.forests.get(key) or self.forests.get((key[0], not key[1]))
            if forest is None:
                continue  # a kind never measured here: counted as free, and said so by `coverage`
            work = np.array([max(kernels[i].work, 1.0) for i in idx])
            out[idx] = work * np.exp(forest.predict(np.array([kernels[i].features() for i in idx])))
        return out

    def kind_sums_us(self, path: Path) -> tuple[np.ndarray, bool]:
        """[1, sum of conv kernels, sum of dwconv kernels, ..., Q/DQ kilo-elements] (microseconds), and whether
        the model is int8."""
        kernels = kernels_of(path)
        us = self.kernel_us(kernels)
        sums = [1.0] + [float(sum(u for k, u in zip(kernels, us) if k.kind == kind)) for kind in KINDS]
        int8 = any(k.int8 for k in kernels)
        return np.array(sums + [qdq_kilo_elements(path) if int8 else 0.0]), int8

    def predict_ms(self, path: Path) -> float:
        sums, int8 = self.kind_sums_us(path)
        return float(np.dot(self.correction["int8" if int8 else "fp32"], sums)) / 1e3

    def coverage(self, path: Path) -> list[str]:
        return sorted({k.kind for k in kernels_of(path) if (k.kind, k.int8) not in self.forests
                       and (k.kind, not k.int8) not in self.forests})

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Written atomically: a reader (a profile running meanwhile) sees the old file or the new one."""
        from device_agent.storage import atomic_write_bytes

        self.meta = meta
        atomic_write_bytes(path, json.dumps({"meta": meta, "reference_ms": self.reference_ms,
                                             "correction": self.correction, "samples": self.samples}).encode())

    @classmethod
    def load(cls, path: Path) -> "KernelPredictor":
        data = json.loads(path.read_text())
        predictor = cls(data["samples"], data["correction"])
        predictor.reference_ms = data.get("reference_ms")
        predictor.meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        return predictor

    def provenance(self) -> str:
        """Where it comes from, in words: "calibrated from N device(s) on DATE", or the date of a calibration that
        predates provenance."""
        cal = self.meta.get("calibration") if isinstance(self.meta.get("calibration"), dict) else None
        if cal and isinstance(cal.get("devices"), list):
            n = len(cal["devices"])
            return f"calibrated from {n} device{'s' if n != 1 else ''} on {cal.get('date') or 'an unknown date'}"
        return f"calibrated in process on {self.meta.get('date') or 'an unknown date'} (no device provenance)"
