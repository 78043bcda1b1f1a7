"""Inference runtimes the agent can run a model with, keyed by the manifest's ``runtime``.

A backend module imports its runtime library only when it is loaded, so an agent with
only one runtime installed still starts.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..registry import Registry


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str | None, ...]
    dtype: str


class Session(ABC):
    """A loaded model, ready to run."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Runtime(ABC):
    name: str

    @classmethod
    def available(cls) -> bool:
        """Whether the library behind this runtime is installed on this device."""
        return True

    @abstractmethod
    def load(self, path: Path, threads: int | None = None) -> Session: ...


RUNTIMES: Registry[type[Runtime]] = Registry("runtime")

# name -> module that registers it; imported on first use
_BACKENDS = {"onnxruntime": "device_agent.runtimes.onnxruntime_backend",
             "tflite": "device_agent.runtimes.tflite_backend"}
#: what pip installs for each runtime on a device (`pipeline provision` picks the target's first that has a wheel)
PIP_REQUIREMENTS = {"onnxruntime": ["onnxruntime>=1.17"], "tflite": ["ai-edge-litert>=1.0"]}
#: the runtime that reads a model file, by its suffix
BY_SUFFIX = {".onnx": "onnxruntime", ".tflite": "tflite"}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES and name in _BACKENDS:
        importlib.import_module(_BACKENDS[name])
    if name not in RUNTIMES:
        RUNTIMES.get(name)  # raises, listing the known names
    return RUNTIMES.get(name)()


def available_runtimes() -> list[str]:
    """The runtimes this device can actually run (their libraries import)."""
    out = []
    for name in known_runtimes():
        try:
            if name not in RUNTIMES:
                importlib.import_module(_BACKENDS[name])
            if RUNTIMES.get(name).available():
                out.append(name)
        except ImportError:
            continue
    return out


def known_runtimes() -> list[str]:
    return sorted(set(RUNTIMES.names()) | set(_BACKENDS))


def runtime_for(path: Path) -> str:
    try:
        return BY_SUFFIX[path.suffix]
    except KeyError:
        raise ValueError(f"{path}: no runtime reads {path.suffix!r} files (known: {sorted(BY_SUFFIX)})") from None
