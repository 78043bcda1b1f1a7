"""Kernel-level latency prediction for a device that was calibrated in person (nn-Meter's approach).

A model runs as a sequence of kernels: a convolution with its BatchNorm and activation fused in,
a depthwise convolution, a fully connected layer, a pooling, a residual add, an elementwise op the runtime
does not fuse (Hardswish, a squeeze-and-excitation scale, a concat). Each kernel's latency on the device is
learnt from isolated single-kernel models measured there (``pipeline targets calibrate``), by a random forest
over its configuration (channels, groups, kernel size, stride, spatial size, MACs, bytes); a model's latency is
the session's fixed cost plus the sum over its kernels. The measured samples are stored as data
(``targets/<name>.kernels.json``) with the channel block the class's kernels compute in (``block``, per
precision, chosen from its own measurements: see ``calibrate.block``); the forests are fitted when loaded, so
nothing pickled is ever loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .static import load_onnx

#: the kernel kinds, in the order of a correction's coefficients (new kinds are appended: see ``_upgrade``)
KINDS = ("conv", "dwconv", "gemm", "pool", "gpool", "add", "eltwise")
#: elementwise ops a kernel of kind ``eltwise`` is (its ``op``): unary activations no runtime fuses into the
#: convolution before them, a product of two activations, a product broadcast over the spatial axes (a
#: squeeze-and-excitation scale), a concat
ELTWISE_OPS = ("hardswish", "hardsigmoid", "sigmoid", "act", "mul", "bcast", "concat")
#: activations onnxruntime's Conv activation fusion folds into the convolution (or GEMM) before them when it is their
#: only consumer; Hardswish is not among them (it runs as HardSigmoid and Mul of its own)
_FUSED = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid"}
_UNARY = {"HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "Sigmoid": "sigmoid", "Relu": "act", "Clip": "act",
          "Tanh": "act", "LeakyRelu": "act", "Elu": "act", "Selu": "act", "Softplus": "act", "Exp": "act"}
_BINARY = {"Mul", "Add", "Sub", "Div"}
#: the channel blocks a class's kernels may compute in (1: none)
BLOCKS = (1, 4, 8, 16)
#: a sample this many times slower than the forest predicts it from the others (out of bag) is taken as slowed by
#: interference, which only ever adds time, and left out of its kind's forest. A kernel's few largest samples sit in
#: leaves of two or three: one slowed run there (this host's calibration timed a 96->192 5x5 convolution at 14x14 at
#: 5.1 ms that runs in 1.1) set the price of every larger kernel (ResNet-18's 3x3 layers at 224 pixels, 2.8x over)
SLOWED = 1.6


def padded(c: int, block: int) -> int:
    """``c`` channels rounded up to a whole number of ``block``-channel blocks."""
    return -(-c // block) * block


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
    #: a dense convolution's groups (1: dense; a depthwise one is kind ``dwconv``)
    groups: int = 1
    #: an ``eltwise`` kernel's op (one of ELTWISE_OPS)
    op: str = ""

    @property
    def out_hw(self) -> tuple[int, int]:
        return -(-self.h // self.stride), -(-self.w // self.stride)

    @property
    def macs(self) -> int:
        ho, wo = self.out_hw
        if self.kind == "conv":
            return self.cout * ho * wo * (self.cin // max(self.groups, 1)) * self.k * self.k
        if self.kind == "dwconv":
            return self.cout * ho * wo * self.k * self.k
        if self.kind == "gemm":
            return self.cin * self.cout
        return self.cin * self.h * self.w

    def features(self, block: int = 1) -> list[float]:
        ho, wo = self.out_hw
        cin_b = padded(self.cin, block) if self.cin >= block else self.cin
        cout_b = padded(self.cout, block)
        # besides sizes: output pixels and the im2col row (cin x k x k) drive int8 kernels with few input
        # channels (a network's first layer), which are im2col-bound rather than MAC-bound; the channels' fit to
        # the block (padding wasted, whole blocks or not: a runtime may take a slower path for the latter); the
        # groups and the elementwise op
        return [self.cin, self.cout, self.k, self.stride, self.h, self.w, np.log1p(self.macs),
                np.log1p(self.cin * self.h * self.w), np.log1p(self.cout * ho * wo),
                self.cin % 16, self.cout % 16, np.log1p(ho * wo), self.cin // max(self.groups, 1) * self.k * self.k,
                np.log1p(self.cout), cin_b / self.cin, cout_b / self.cout, float(self.cin % block == 0),
                float(self.cout % block == 0), np.log2(max(self.groups, 1)),
                ELTWISE_OPS.index(self.op) + 1 if self.op in ELTWISE_OPS else 0]

    def work(self, block: int = 1) -> float:
        """What the kernel's time grows with: its MACs and its output elements (compute kernels), the elements
        it reads (pooling, adds, elementwise ops), with channels counted in whole ``block``-channel blocks where
        the runtime computes in them (a dense convolution's output channels, and its input channels once there
        are a block of them; depthwise, pooling and adds, which run in the blocked layout). The forests learn the
        time per unit of work, which stays bounded beyond the sizes a calibration timed, so a kernel larger than
        any of them is priced by its work, not capped at the largest one measured."""
        ho, wo = self.out_hw
        if self.kind == "conv":
            cout = padded(self.cout, block) if self.groups == 1 else self.cout
            cin = padded(self.cin, block) if self.groups == 1 and self.cin >= block else self.cin
            return float(cout * ho * wo * (cin // max(self.groups, 1)) * self.k * self.k + 16 * cout * ho * wo)
        if self.kind == "dwconv":
            c = padded(self.cout, block)
            return float(c * ho * wo * self.k * self.k + 16 * c * ho * wo)
        if self.kind == "gemm":
            return float(self.cin * self.cout + 16 * self.cout)
        if self.kind == "eltwise":
            return float(self.cin * self.h * self.w)
        return float(padded(self.cin, block) * self.h * self.w)

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "int8": self.int8, "cin": self.cin, "cout": self.cout, "k": self.k,
             "stride": self.stride, "h": self.h, "w": self.w}
        if self.groups != 1:
            d["groups"] = self.groups
        if self.op:
            d["op"] = self.op
        return d


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


def _dims(x: list[int]) -> tuple[int, int, int]:
    """(channels, height, width) of an activation's shape (1 for what it lacks; the batch is dropped)."""
    rest = x[1:] or [1]
    return rest[0], int(np.prod(rest[1:2] or [1])), int(np.prod(rest[2:] or [1]))


def kernels_of(path: Path) -> list[Kernel]:
    """The kernels onnxruntime will run for a model, from its exported graph (BN and activations fused
    into the convolution or GEMM before them, Q/DQ pairs folded into int8 kernels, shape ops free)."""
    model = load_onnx(path)
    g = model.graph
    values = {vi.name: vi for vi in [*g.input, *g.output, *g.value_info]}
    inits = {t.name: list(t.dims) for t in g.initializer}
    int8 = any(n.op_type == "DequantizeLinear" for n in g.node)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    # tensors computed from constants only (a weight's DequantizeLinear, shapes): never an activation
    constant = set(inits)
    for n in g.node:
        if n.op_type == "Constant" or (n.input and all(i in constant or not i for i in n.input)):
            constant.update(n.output)

    def source(name: str) -> str:  # look through a DequantizeLinear to the tensor behind it
        n = producer.get(name)
        return n.input[0] if n is not None and n.op_type == "DequantizeLinear" else name

    def fused(node: onnx.NodeProto) -> bool:
        """an activation the runtime folds into the convolution or GEMM that alone feeds it (a ReLU after a residual
        add too: the blocked convolution takes the sum and its activation in)"""
        src = producer.get(node.input[0])
        fusers = ("Conv", "Gemm", "Add") if node.op_type in ("Relu", "Clip") else ("Conv", "Gemm")
        return src is not None and src.op_type in fusers and consumers.get(node.input[0]) == 1

    out = []
    for node in g.node:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        acts = [i for i in node.input if i and i not in constant]
        if op == "Conv":
            w = inits.get(source(node.input[1])) or _shape(values, node.input[1])
            x = _shape(values, node.input[0])
            if len(w) != 4 or len(x) != 4:
                continue
            group = int(attrs.get("group", 1))
            stride = int(attrs.get("strides", [1])[0])
            depthwise = group > 1 and w[1] == 1 and group == x[1]
            # kernels are sampled with "same" padding: a convolution without it computes the outputs of one
            # on the input size that gives its output size
            pads = list(attrs.get("pads", [0, 0, 0, 0])) or [0, 0, 0, 0]
            ho = (x[2] + pads[0] + pads[2] - w[2]) // stride + 1
            wo = (x[3] + pads[1] + pads[3] - w[3]) // stride + 1
            h, wd = (x[2], x[3]) if -(-x[2] // stride) == ho and -(-x[3] // stride) == wo else (ho * stride, wo * stride)
            out.append(Kernel("dwconv" if depthwise else "conv", int8, x[1], w[0], w[2], stride, h, wd,
                              1 if depthwise else group))
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
        elif op in _BINARY and len(acts) == 2:
            shapes = [_shape(values, i) for i in acts]
            y = _shape(values, node.output[0])
            if not y:
                continue
            c, h, wd = _dims(y)
            if op == "Add" and shapes[0] == shapes[1] and len(y) == 4:
                out.append(Kernel("add", int8, c, c, 1, 1, h, wd))
            else:
                out.append(Kernel("eltwise", int8, c, c, 1, 1, h, wd, op="mul" if shapes[0] == shapes[1] else "bcast"))
        elif (op in _UNARY or op in _BINARY) and len(acts) == 1 and not (op in _FUSED and fused(node)):
            if op in _BINARY and fused(node):  # a constant scale or shift right after a convolution: folded into it
                continue
            x = _shape(values, acts[0])
            if x:
                c, h, wd = _dims(x)
                out.append(Kernel("eltwise", int8, c, c, 1, 1, h, wd, op=_UNARY.get(op, "act")))
        elif op == "Concat" and len(acts) > 1:
            y = _shape(values, node.output[0])
            if y:
                c, h, wd = _dims(y)
                out.append(Kernel("eltwise", int8, c, c, 1, 1, h, wd, op="concat"))
    return out


def _upgrade(correction: list[float]) -> list[float]:
    """A correction stored before the newer kinds existed: those kinds' kernels counted as measured (1.0)."""
    missing = 1 + len(KINDS) + 1 - len(correction)
    return list(correction[:-1]) + [1.0] * missing + list(correction[-1:]) if missing > 0 else list(correction)


class KernelPredictor:
    """Random forests per (kind, int8), fitted on measured samples; predicts microseconds."""

    def __init__(self, samples: list[dict[str, Any]], correction: dict[str, list[float]] | None = None,
                 block: dict[str, int] | None = None) -> None:
        from sklearn.ensemble import RandomForestRegressor

        #: per precision, model latency = a + sum over kinds of b_kind x (kernel predictions of that kind)
        #: + c x (thousands of elements through activation Q/DQ), fitted on whole models:
        #: [a, b_conv, b_dwconv, ..., c] in KINDS order
        self.correction = ({p: _upgrade(c) for p, c in correction.items()} if correction
                           else {p: [0.0] + [1.0] * len(KINDS) + [0.0] for p in ("fp32", "int8")})
        #: per precision, the channel block the class's kernels compute in (1: none; a calibration that predates it)
        self.block = {"fp32": 1, "int8": 1, **(block or {})}
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
        #: per (kind, int8), how many samples were left out as slowed by interference (see ``SLOWED``)
        self.left_out: dict[str, int] = {}
        for key, rows in groups.items():
            b = self._block(key[1])
            kernels = [Kernel(**r["kernel"]) for r in rows]
            x = np.array([k.features(b) for k in kernels])
            y = np.log(np.array([max(r["us"], 0.05) for r in rows]) / np.array([max(k.work(b), 1.0) for k in kernels]))
            forest = RandomForestRegressor(n_estimators=120, min_samples_leaf=2, random_state=0, n_jobs=1,
                                           oob_score=len(rows) >= 20)
            forest.fit(x, y)
            if len(rows) >= 20:
                keep = y - forest.oob_prediction_ <= np.log(SLOWED)
                if not keep.all():
                    forest = RandomForestRegressor(n_estimators=120, min_samples_leaf=2, random_state=0, n_jobs=1)
                    forest.fit(x[keep], y[keep])
                    self.left_out[f"{key[0]}{'-int8' if key[1] else ''}"] = int((~keep).sum())
            self.forests[key] = forest

    def _block(self, int8: bool) -> int:
        return int(self.block["int8" if int8 else "fp32"])

    def kernel_us(self, kernels: list[Kernel]) -> np.ndarray:
        out = np.zeros(len(kernels))
        for key in {(k.kind, k.int8) for k in kernels}:
            idx = [i for i, k in enumerate(kernels) if (k.kind, k.int8) == key]
            fkey = key if key in self.forests else (key[0], not key[1])
            forest = self.forests.get(fkey)
            if forest is None:
                continue  # a kind never measured here: counted as free, and said so by `coverage`
            b = self._block(fkey[1])
            work = np.array([max(kernels[i].work(b), 1.0) for i in idx])
            out[idx] = work * np.exp(forest.predict(np.array([kernels[i].features(b) for i in idx])))
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
        atomic_write_bytes(path, json.dumps({"meta": meta, "reference_ms": self.reference_ms, "block": self.block,
                                             "correction": self.correction, "samples": self.samples}).encode())

    @classmethod
    def load(cls, path: Path) -> "KernelPredictor":
        data = json.loads(path.read_text())
        predictor = cls(data["samples"], data["correction"], data.get("block"))
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
