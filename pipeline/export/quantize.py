"""Post-training quantization with ONNX Runtime, keyed by deploy.yaml's ``export.quantize``."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from ..registry import Registry
from .onnx_files import minify, toposort
from .parity import ort_predict, sqnr_db
from .reference import reference_file

log = logging.getLogger(__name__)

#: (fp32 model, output path, calibration inputs) -> quantized model path
Quantizer = Callable[[Path, Path, np.ndarray], Path]
QUANTIZERS: Registry[Quantizer | None] = Registry("quantization")
QUANTIZERS.register("none")(None)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an array of samples."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self._items = iter([{input_name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - required by some onnxruntime versions
        pass


@QUANTIZERS.register("int8-static")
def int8_static(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """QDQ int8: per-channel symmetric weights, activations calibrated (MinMax) on ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnxruntime as ort

    input_name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(dst), _Calibration(input_name, calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:
            raise ExportError(f"int8 static quantization of {src.name} failed: {exc}") from None
    return dst


@QUANTIZERS.register("int8-dynamic")
def int8_dynamic(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """int8 weights, activations quantized at run time (no calibration; best for Linear-heavy models)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        except Exception as exc:
            raise ExportError(f"int8 dynamic quantization of {src.name} failed: {exc}") from None
    return dst


@QUANTIZERS.register("fp16")
def fp16(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """Weights and activations in float16; inputs and outputs stay float32 for the caller."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = toposort(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
        onnx.save(model, str(dst))
        onnx.checker.check_model(str(dst))
    except Exception as exc:
        raise ExportError(f"fp16 conversion of {src.name} failed: {exc}") from None
    return dst


def quantize_model(kind: str, src: Path, dst: Path, calibration: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, max_drop: float) -> tuple[Path, dict[str, Any]]:
    """Quantize, then measure accuracy and SQNR against the fp32 model; refuse a drop above ``max_drop``."""
    fn = QUANTIZERS.get(kind)
    if fn is None:
        return src, {}
    fn(src, dst, calibration)
    minify(dst)
    return dst, quantization_report(kind, src, dst, x_test, y_test, max_drop)


def quantization_report(kind: str, src: Path, dst: Path, x_test: np.ndarray, y_test: np.ndarray,
                        max_drop: float) -> dict[str, Any]:
    """Accuracy, SQNR and max abs diff of a quantized model file against its fp32 source (any format).

    The gate measures what the *target* computes, not what this host's int8 kernels do: an ONNX model
    runs with the reference int8 semantics (its QDQ graph as written: DequantizeLinear, float op,
    QuantizeLinear; no fused integer kernel), which is what ARM's and VNNI's exact integer kernels
    compute too, up to rounding ties. So the figures are the same on an x86 host with or without VNNI.
    ``host_kernels`` beside them says what this host's fused kernels compute (they saturate on x86
    without VNNI); it is information, never the gate.
    """
    ref = ort_predict(src, x_test)
    with reference_file(dst) as reference:  # dynamic int8: its integer kernels as float arithmetic
        got = ort_predict(reference, x_test)
    report = {
        "kind": kind, "max_abs_diff": float(np.max(np.abs(ref - got))),
        "accuracy_fp32": float((ref.argmax(1) == y_test).mean()),
        "accuracy_quantized": float((got.argmax(1) == y_test).mean()),
        "sqnr_db": sqnr_db(ref, got),
        "size_fp32_bytes": src.stat().st_size,
        "size_quantized_bytes": dst.stat().st_size,
    }
    if dst.suffix == ".onnx":
        report.update(_semantics(dst, ref, got, x_test, y_test))
    drop = report["accuracy_fp32"] - report["accuracy_quantized"]
    if drop > max_drop:
        raise ExportError(
            f"{kind}: accuracy fell {drop:.2%} ({report['accuracy_fp32']:.2%} -> {report['accuracy_quantized']:.2%}), "
            f"more than export.max_accuracy_drop {max_drop:.2%}; use more calibration_samples or quantize: none"
        )
    return report


def _semantics(dst: Path, ref: np.ndarray, got: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """How the gate's figures were computed, and what this host's fused integer kernels make of the model."""
    from device_agent.cpu import read_cpu_features
    from device_agent.runtimes.onnxruntime_backend import Int8Semantics, integer_ops

    cpu = read_cpu_features()
    kernels = ort_predict(dst, x_test, int8=Int8Semantics.KERNELS)
    host = {"cpu": cpu.model_name, "int8_dot": cpu.int8_dot, "u8s8_saturates": cpu.u8s8_saturates,
            "accuracy": float((kernels.argmax(1) == y_test).mean()), "sqnr_db": sqnr_db(ref, kernels),
            "max_abs_diff_vs_gate": float(np.max(np.abs(kernels - got)))}
    if host["max_abs_diff_vs_gate"] > 0 and cpu.u8s8_saturates:
        log.info("%s: this host's int8 kernels saturate (SQNR %s dB, accuracy %.2f%%); the gate uses the reference "
                 "semantics (SQNR %s dB)", dst.name, host["sqnr_db"], 100 * host["accuracy"], sqnr_db(ref, got))
    return {"semantics": "reference-float-twin" if integer_ops(dst) else "reference", "host_kernels": host}
