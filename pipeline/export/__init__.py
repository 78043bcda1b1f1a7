"""Export a PyTorch model for a device runtime, check parity, optionally quantize.

Exporters and quantizers are registries keyed by deploy.yaml's ``export.format`` and
``export.quantize``; onnxruntime is imported only inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .onnx_export import EXPORTERS, export_model, minify, simplify
from .parity import check_parity, ort_predict
from .quantize import QUANTIZERS, quantization_report, quantize_model


@dataclass
class ExportResult:
    path: Path
    format: str
    quantization: str
    size_bytes: int
    parity: dict[str, Any]
    quantization_report: dict[str, Any] = field(default_factory=dict)
    #: an ONNX twin of the same model and precision, for static analysis when ``path`` is not ONNX
    analysis_path: Path | None = None


__all__ = ["EXPORTERS", "QUANTIZERS", "ExportResult", "check_parity", "export_model", "minify", "ort_predict", "quantization_report", "quantize_model", "simplify"]
