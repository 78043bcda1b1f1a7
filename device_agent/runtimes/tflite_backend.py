"""TFLite backend: the LiteRT interpreter (``ai-edge-litert``, numpy 2) or, on older devices,
``tflite-runtime`` (numpy < 2). Full-integer models take and return int8/uint8 tensors; the session
quantizes float inputs and dequantizes outputs with the model's own parameters, so callers (golden
vectors, benchmarks) always speak float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RuntimeBackendError
from . import RUNTIMES, Runtime, Session, TensorSpec


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        raise RuntimeBackendError("no TFLite interpreter: install ai-edge-litert (numpy 2) or tflite-runtime "
                                  "(numpy < 2)") from None


class TFLiteSession(Session):
    def __init__(self, interpreter) -> None:
        self._it = interpreter
        self._in = interpreter.get_input_details()
        self._out = interpreter.get_output_details()
        self.inputs = [TensorSpec(d["name"], tuple(int(s) for s in d["shape"]), "float32") for d in self._in]
        self.outputs = [TensorSpec(d["name"], tuple(int(s) for s in d["shape"]), "float32") for d in self._out]
        self._by_name = {spec.name: d for spec, d in zip(self.inputs, self._in)}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            for i, (name, value) in enumerate(feeds.items()):
                d = self._by_name.get(name, self._in[i])
                if tuple(value.shape) != tuple(d["shape"]):
                    self._it.resize_tensor_input(d["index"], list(value.shape))
                    self._it.allocate_tensors()
                self._it.set_tensor(d["index"], _to_model(value, d))
            self._it.invoke()
            return [_from_model(self._it.get_tensor(d["index"]), d) for d in self._out]
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"tflite: inference failed ({exc})") from None


def _to_model(x: np.ndarray, detail) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer):
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _from_model(y: np.ndarray, detail) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        scale, zero = detail["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return np.array(y, copy=True)


@RUNTIMES.register("tflite")
class TFLiteRuntime(Runtime):
    name = "tflite"

    @classmethod
    def available(cls) -> bool:
        try:
            _interpreter_class()
            return True
        except RuntimeBackendError:
            return False

    def load(self, path: Path, threads: int | None = None) -> Session:
        cls = _interpreter_class()
        try:
            it = cls(model_path=str(path), num_threads=threads or None)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"tflite cannot load {path}: {exc}") from None
        return TFLiteSession(it)
