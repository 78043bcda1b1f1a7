"""Export a PyTorch model for a device runtime, check parity, optionally quantize.

One backend per format (:mod:`.backend`: ``onnx_backend``, ``tflite_backend``), keyed by deploy.yaml's
``export.format``; the formats' facts as plain data in :mod:`.formats`; the stage that sequences export,
parity, simplification and quantization in :mod:`.stage`. Importing this package, ``formats`` or
``backend`` loads no torch, onnx, onnxruntime or litert: the names below that need them load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .backend import BACKENDS, ExportBackend, backend_for_file, export_model, get_backend
from .formats import FORMATS, Format, all_quantizations, format_of_file, get_format

#: name -> the module that defines it, imported when the name is first read
_LAZY = {
    "ExportResult": "stage", "export_stage": "stage",
    "check_parity": "parity", "ort_predict": "parity",
    "minify": "onnx_files", "simplify": "onnx_files",
    "QUANTIZERS": "quantize", "quantization_report": "quantize", "quantize_model": "quantize",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["BACKENDS", "FORMATS", "ExportBackend", "Format", "all_quantizations", "backend_for_file",
           "export_model", "format_of_file", "get_backend", "get_format", *_LAZY]
