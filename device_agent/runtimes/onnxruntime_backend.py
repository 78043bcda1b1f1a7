"""ONNX Runtime backend (CPU execution provider).

int8 semantics. A QDQ model (``QuantizeLinear``/``DequantizeLinear`` around float ops) says what it
computes: dequantize, run the float op, quantize again ("fake-quant"). onnxruntime normally fuses
each such group into an integer kernel (QLinearConv, QGemm, ...), which computes the same thing
exactly on ARM and on x86 with VNNI, but saturates int16 pair sums on x86 without VNNI
(:mod:`device_agent.cpu`). So a model loads with

- ``Int8Semantics.KERNELS``: onnxruntime's fused integer kernels (fast; the default where they are exact);
- ``Int8Semantics.REFERENCE``: QDQ fusion switched off (``session.disable_quant_qdq``), so every
  ``DequantizeLinear -> float op -> QuantizeLinear`` runs as written and no integer kernel is used:
  the same numbers on every CPU. The default where U8S8 kernels saturate, and what the host uses for
  its accuracy gate and golden vectors.

A model whose graph itself names integer ops (``MatMulInteger``/``ConvInteger`` from dynamic
quantization) has no fake-quant form a device could switch to (the host judges it through a float twin,
``pipeline/export/reference.py``); on a saturating CPU the agent refuses it with a clear error.
``EDGEFLEET_CPU_FLAGS`` (see :mod:`device_agent.cpu`) or ``load(..., cpu=...)`` picks another CPU's path.
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path

import numpy as np

from ..cpu import CpuFeatures, read_cpu_features
from ..errors import RuntimeBackendError
from . import RUNTIMES, Runtime, Session, TensorSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float16)": "float16"}
#: op types (stored verbatim in the model's protobuf) that run onnxruntime's integer GEMM as written
INTEGER_OPS = (b"MatMulInteger", b"ConvInteger", b"QLinearConv", b"QLinearMatMul", b"DynamicQuantizeMatMul")
DISABLE_QDQ_FUSION = "session.disable_quant_qdq"


class Int8Semantics(str, enum.Enum):
    KERNELS = "kernels"
    REFERENCE = "reference"


def default_semantics(cpu: CpuFeatures) -> Int8Semantics:
    return Int8Semantics.REFERENCE if cpu.u8s8_saturates else Int8Semantics.KERNELS


def session_options(threads: int | None = None, int8: Int8Semantics = Int8Semantics.KERNELS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if Int8Semantics(int8) is Int8Semantics.REFERENCE:
        options.add_session_config_entry(DISABLE_QDQ_FUSION, "1")
    return options


def integer_ops(path: Path) -> list[str]:
    """The integer-kernel op types a model file's graph names itself (not those onnxruntime would fuse)."""
    data = Path(path).read_bytes()
    return [op.decode() for op in INTEGER_OPS if op in data]


class OrtSession(Session):
    def __init__(self, session, int8: Int8Semantics = Int8Semantics.KERNELS) -> None:  # onnxruntime.InferenceSession
        self._session = session
        self.int8_semantics = Int8Semantics(int8)
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeBackendError(f"onnxruntime: inference failed ({exc})") from None


@RUNTIMES.register("onnxruntime")
class OnnxRuntime(Runtime):
    name = "onnxruntime"

    @classmethod
    def available(cls) -> bool:
        import importlib.util

        return importlib.util.find_spec("onnxruntime") is not None

    def load(self, path: Path, threads: int | None = None, *, int8: Int8Semantics | str | None = None,
             cpu: CpuFeatures | None = None) -> Session:
        """``int8``: None picks :func:`default_semantics` for ``cpu`` (default: this CPU, read once per load)."""
        import onnxruntime as ort

        cpu = cpu or read_cpu_features()
        semantics = Int8Semantics(int8) if int8 is not None else default_semantics(cpu)
        if cpu.u8s8_saturates:
            ops = integer_ops(path)
            if ops:
                raise RuntimeBackendError(
                    f"{Path(path).name} runs integer kernels ({', '.join(ops)}) that saturate on this CPU "
                    f"({cpu.model_name}: x86 without AVX-512 VNNI or AVX-VNNI; flags from {cpu.source}); "
                    "deploy a QDQ (int8-static) or float model to this device class")
            if semantics is Int8Semantics.KERNELS:
                log.warning("int8 kernels requested on a CPU whose U8S8 kernels saturate (%s)", cpu.model_name)
        try:
            session = ort.InferenceSession(str(path), session_options(threads, semantics),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime cannot load {path}: {exc}") from None
        return OrtSession(session, semantics)

    def load_reference(self, path: Path, threads: int | None = None) -> Session:
        """What the model's QDQ graph says, the same on every CPU: for golden vectors and accuracy gates."""
        return self.load(path, threads, int8=Int8Semantics.REFERENCE)
