"""The export stage: export, check parity with PyTorch, simplify (parity again), quantize (accuracy and
SQNR against fp32), for the format deploy.yaml's ``export`` section names. Format facts and steps come
from the format's backend; this module only sequences them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import ExportBackend, get_backend

if TYPE_CHECKING:
    from torch import nn

    from ..config import ExportConfig
    from ..ui import UI


@dataclass
class ExportResult:
    path: Path
    format: str
    quantization: str
    size_bytes: int
    parity: dict[str, Any]
    quantization_report: dict[str, Any] = field(default_factory=dict)
    #: a file of the same model and precision for static analysis (an ONNX twin when ``path`` is not ONNX)
    analysis_path: Path | None = None


def export_stage(export: ExportConfig, model: nn.Module, data, out: Path, ui: UI, quantize: str) -> ExportResult:
    """``model`` in ``export.format``, quantized as ``quantize`` says, every file checked against PyTorch.

    ``data`` gives the input shape, the test set (parity, accuracy) and the calibration samples."""
    backend = get_backend(export.format)
    twin = None
    if backend.analysis_twin is not None:  # exported first, so that its checks run first as before
        twin = export_stage(export.model_copy(update={"format": backend.analysis_twin}), model, data, out, ui,
                            quantize).path
    result = _export(backend, export, model, data, out, ui, quantize)
    result.analysis_path = twin or result.path
    return result


def _export(backend: ExportBackend, export: ExportConfig, model: nn.Module, data, out: Path, ui: UI,
            quantize: str) -> ExportResult:
    from .parity import check_parity
    from .quantize import quantization_report

    fp32 = backend.export(model, data.input_shape, out / f"model-fp32{backend.suffix}", export.opset)
    parity = check_parity(model, fp32, data.x_test, data.y_test, export.parity_atol)
    ui.info(f"{backend.display} parity vs PyTorch: max abs diff {parity['max_abs_diff']:.2e} (tolerance "
            f"{parity['atol']:g}, {len(parity['outputs'])} output(s)), accuracy {parity['accuracy_torch']:.2%} "
            f"torch / {parity['accuracy_onnx']:.2%} {backend.label}")
    if export.simplify:
        slim_path = backend.simplify(fp32, out / f"model-fp32-slim{backend.suffix}")
        if slim_path is not None:
            fp32 = slim_path
            slim = check_parity(model, fp32, data.x_test, data.y_test, export.parity_atol)
            parity["simplified"] = slim
            ui.info(f"simplified: parity max abs diff {slim['max_abs_diff']:.2e}, {fp32.stat().st_size:,} bytes")
    calib = data.x_train[: export.calibration_samples]
    final = backend.quantize(quantize, model, fp32, out / f"model{backend.suffix}", calib, data.input_shape)
    qreport: dict[str, Any] = {}
    if quantize != "none":
        qreport = quantization_report(backend.quantization_label(quantize), fp32, final, data.x_test, data.y_test,
                                      export.max_accuracy_drop)
        ui.info(f"{backend.display} {quantize}: accuracy {qreport['accuracy_fp32']:.2%} -> {qreport['accuracy_quantized']:.2%}, "
                f"SQNR {qreport['sqnr_db']} dB, {qreport['size_fp32_bytes']:,} -> "
                f"{qreport['size_quantized_bytes']:,} bytes")
    return ExportResult(final, backend.name, quantize, final.stat().st_size, parity, qreport)


__all__ = ["ExportResult", "export_stage"]
