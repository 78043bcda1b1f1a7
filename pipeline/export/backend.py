"""What every export format's backend provides, and the registry that finds one by format name.

A backend converts a PyTorch model into its format (``export``), optionally simplifies the file,
produces each quantization its format allows (``quantize``), and runs a file of its format on this host
(``run``: every output, by name) for the parity and quantization checks. Its facts (name, suffix,
runtime, quantizations, default tolerance) are class attributes, the same as the row of
:data:`pipeline.export.formats.FORMATS`. Backend modules import torch, onnx or litert; this one does
not, and imports a backend module only when its format is asked for. A new format is one backend file
plus its row in ``formats.py``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from device_agent.registry import Registry

from .formats import FORMATS, Format, format_of_file, get_format

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


class ExportBackend(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]
    runtime: ClassVar[str]
    quantizations: ClassVar[tuple[str, ...]]
    default_atol: ClassVar[float]
    #: how logs name the format, and the runtime that ``run`` uses
    display: ClassVar[str]
    label: ClassVar[str]
    #: a format whose file is also exported, for static analysis, when this one's cannot be analysed as well
    analysis_twin: ClassVar[str | None] = None

    @abstractmethod
    def export(self, model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> Path:
        """The fp32 model in this format, written to ``path``."""

    def simplify(self, src: Path, dst: Path) -> Path | None:
        """A simplified copy of ``src`` at ``dst`` (the caller checks parity again), or None: nothing to do."""
        return None

    @abstractmethod
    def quantize(self, kind: str, model: nn.Module, fp32: Path, dst: Path, calibration: np.ndarray,
                 input_shape: tuple[int, ...]) -> Path:
        """The deployable file at ``dst``: ``fp32`` as shipped for ``kind`` "none", else quantized."""

    def quantization_label(self, kind: str) -> str:
        """How the quantization report names ``kind``."""
        return kind

    @abstractmethod
    def run(self, path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model file for ``x``, by output name, in the file's order."""

    @classmethod
    def format(cls) -> Format:
        return FORMATS[cls.name]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "suffix": self.suffix, "runtime": self.runtime,
                "quantizations": list(self.quantizations), "default_atol": self.default_atol}


BACKENDS: Registry[type[ExportBackend]] = Registry("export format")


def get_backend(name: str) -> ExportBackend:
    """The backend for format ``name``, importing its module on first use; unknown names list the known."""
    fmt = get_format(name)
    if name not in BACKENDS:
        importlib.import_module(fmt.backend)
    return BACKENDS.get(name)()


def backend_for_file(path: Path) -> ExportBackend:
    """The backend for a model file, recognised by its content."""
    return get_backend(format_of_file(path).name)


def export_model(fmt: str, model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> Path:
    """``model`` in format ``fmt`` (fp32) at ``path``; ``opset`` is read by the formats that have one."""
    return get_backend(fmt).export(model, input_shape, path, opset)


__all__ = ["BACKENDS", "ExportBackend", "backend_for_file", "export_model", "get_backend"]
