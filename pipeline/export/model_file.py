"""A model file the user already has (``.onnx`` or ``.tflite``): recognised by its content, checked, and described
(its input and outputs) by the same runtime the device will run it with. No PyTorch.

Everything that can be wrong with such a file is one ModelError naming the file and what is wrong with it: not a
model at all, a truncated or corrupt one, one the runtime cannot load, more than one input, an input that is not
a float tensor. Whether the user's data fits the file's input is checked against the data (``check_inputs``), and
a mismatch is a ConfigError naming both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from .formats import Format, format_of_file

#: how many bytes a model file may have before we refuse to read it for inspection
MAX_MODEL_BYTES = 2 * 2**30
_FLOAT = ("float32", "float16", "float")


@dataclass(frozen=True)
class ModelFile:
    path: Path
    format: Format
    input_name: str
    #: the input's shape, the batch dimension first; a dynamic dimension is None
    input_shape: tuple[int | None, ...]
    input_dtype: str
    outputs: tuple[str, ...]
    #: each output's shape, as the file declares it (a dynamic dimension is None)
    output_shapes: tuple[tuple[int | None, ...], ...] = ()

    @property
    def classes(self) -> int | None:
        """How many scores the first output gives per sample (batch x N), when the file fixes it."""
        shape = self.output_shapes[0] if self.output_shapes else ()
        return shape[1] if len(shape) == 2 else None

    @property
    def batch(self) -> int | None:
        """The fixed batch size (often 1), or None when the batch dimension is dynamic."""
        return self.input_shape[0] if self.input_shape else None

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        return self.input_shape[1:]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format.name, "input": self.input_name,
                "input_shape": list(self.input_shape), "input_dtype": self.input_dtype, "outputs": list(self.outputs),
                "output_shapes": [list(s) for s in self.output_shapes],
                "size_bytes": self.path.stat().st_size}


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _check_onnx(path: Path) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{path}: not an ONNX model nor a TFLite flatbuffer (ONNX's parser says: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model nor a TFLite flatbuffer (no graph: is it another kind of file?)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # the checker raises ValidationError and, for some files, others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: an invalid ONNX model: {first}") from None


def inspect_model_file(path: Path) -> ModelFile:
    """``path`` checked as a model file and described; a ModelError names what is wrong."""
    from device_agent.runtimes import get_runtime

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: the file is empty")
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"{path}: {size:,} bytes, more than the {MAX_MODEL_BYTES:,} a model file may have")
    fmt = format_of_file(path)
    if fmt.name == "onnx":
        _check_onnx(path)
    try:
        session = get_runtime(fmt.runtime).load(path)
    except Exception as exc:  # each runtime raises its own kinds for a file it cannot load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: {fmt.runtime} cannot load this {fmt.name} file: {first[:300]}") from None
    if len(session.inputs) != 1:
        names = ", ".join(i.name for i in session.inputs)
        raise ModelError(f"{path}: {len(session.inputs)} inputs ({names}); edgefleet deploys models with one input "
                         "tensor")
    spec = session.inputs[0]
    if not any(spec.dtype.startswith(f) for f in _FLOAT) and fmt.name == "onnx":
        raise ModelError(f"{path}: input {spec.name!r} is {spec.dtype}; edgefleet feeds float32 tensors")
    if not spec.shape:
        raise ModelError(f"{path}: input {spec.name!r} is a scalar; edgefleet feeds a batch of samples")
    return ModelFile(path, fmt, spec.name, tuple(_dim(d) for d in spec.shape), spec.dtype,
                     tuple(o.name for o in session.outputs),
                     tuple(tuple(_dim(d) for d in o.shape) for o in session.outputs))


def check_inputs(model: ModelFile, sample_shape: tuple[int, ...], where: str) -> None:
    """The data's samples (``sample_shape``, without the batch dimension) must fit the file's input; else one
    ConfigError naming both shapes (``where``: the data's origin, e.g. deploy.yaml's data section)."""
    want = model.sample_shape
    fits = len(want) == len(sample_shape) and all(w is None or w == s for w, s in zip(want, sample_shape))
    if not fits:
        shown = tuple("?" if w is None else w for w in model.input_shape)
        raise ConfigError(f"{where}: samples of shape {tuple(sample_shape)} do not fit the input {model.input_name!r} "
                          f"of {model.path.name}, shape {shown} (batch first); give data of that shape, or a "
                          "preprocess step that makes it")


__all__ = ["MAX_MODEL_BYTES", "ModelFile", "check_inputs", "inspect_model_file"]
