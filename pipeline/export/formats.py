"""The export formats deploy.yaml's ``export.format`` names, as plain data.

One row per format: the file suffix, the device runtime that runs it, the ``export.quantize`` kinds it
allows, the default parity tolerance and the module of its backend. This module imports nothing heavy
(no torch, onnx, onnxruntime or litert), so config validation and ``--help`` can read it; each backend
class declares the same facts as class attributes, and a test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_agent.registry import UnknownNameError


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    #: the device agent's runtime for it (``device_agent.runtimes``), which a target must list
    runtime: str
    #: the ``export.quantize`` kinds this format's backend can produce, "none" first
    quantizations: tuple[str, ...]
    #: max abs diff allowed between the exported model and PyTorch
    default_atol: float
    #: the module whose import registers the backend class
    backend: str
    #: how a file of this format is recognised by content: (offset, bytes); None: by elimination
    magic: tuple[int, bytes] | None = None
    #: what export.quantize's kinds mean here, when it is not what they mean for ONNX
    note: str = ""


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", "onnxruntime", ("none", "int8-static", "int8-dynamic", "fp16"), 1e-4,
           "pipeline.export.onnx_backend"),
    Format("tflite", ".tflite", "tflite", ("none", "int8-static"), 1e-4, "pipeline.export.tflite_backend",
           magic=(4, b"TFL3"), note="int8-static is full-integer there"),
)}


def get_format(name: str) -> Format:
    """The format deploy.yaml names ``name``; an unknown one fails listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownNameError(f"unknown export format {name!r}; known: {', '.join(format_names())}") from None


def format_names() -> list[str]:
    return sorted(FORMATS)


def all_quantizations() -> list[str]:
    """Every ``export.quantize`` kind some format allows (what ``fit.quantizations`` may name), sorted."""
    return sorted({q for f in FORMATS.values() for q in f.quantizations})


def format_of_file(path: Path) -> Format:
    """The format of a model file by its content (not its name): the format whose magic bytes it carries,
    else the one format without magic bytes (ONNX: a protobuf has none)."""
    with open(path, "rb") as f:
        head = f.read(64)
    for fmt in FORMATS.values():
        if fmt.magic is not None and head[fmt.magic[0]:fmt.magic[0] + len(fmt.magic[1])] == fmt.magic[1]:
            return fmt
    return next(f for f in FORMATS.values() if f.magic is None)


__all__ = ["FORMATS", "Format", "all_quantizations", "format_names", "format_of_file", "get_format"]
