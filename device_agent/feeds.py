"""A request body as the session's feeds (device_agent.serving): JSON tensors or a raw ``.npy``, every way it can
be wrong a ``RequestError`` naming the input and what the model takes."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .npy import read_npy
from .runtimes import Session

NPY = "application/x-npy"


class RequestError(Exception):
    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after
        self.counted = False  # in the traffic stats already (the API counts where it knows the version)


_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
           "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def _expected(spec) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "any" for d in spec.shape) + "]"


def check_input(spec, value: np.ndarray) -> np.ndarray:
    """``value`` as the model's input ``spec`` takes it, or a 400 naming the input and what it expects."""
    want = np.dtype(_DTYPES.get(spec.dtype, np.float32))
    if value.dtype != want:
        if value.dtype.kind not in "fiub" or (want.kind in "iu" and value.dtype.kind == "f"):
            raise RequestError(400, "bad_request", f"input {spec.name!r}: dtype {value.dtype}, the model takes "
                                                   f"{want}")
        value = value.astype(want)
    if len(value.shape) != len(spec.shape) or any(isinstance(d, int) and d != got
                                                   for d, got in zip(spec.shape, value.shape)):
        raise RequestError(400, "bad_request", f"input {spec.name!r}: shape {list(value.shape)}, the model takes "
                                               f"{_expected(spec)}")
    if 0 in value.shape:
        raise RequestError(400, "bad_request", f"input {spec.name!r}: shape {list(value.shape)} is empty")
    return value


def _tensor(name: str, raw: Any) -> np.ndarray:
    shape, dtype = None, None
    if isinstance(raw, dict):
        shape, dtype, raw = raw.get("shape"), raw.get("dtype"), raw.get("data")
        if dtype is not None and dtype not in _DTYPES:
            raise RequestError(400, "bad_request", f"input {name!r}: dtype {str(dtype)[:20]!r} unknown; "
                                                   f"one of {sorted(_DTYPES)}")
    if not isinstance(raw, list):
        raise RequestError(400, "bad_request", f"input {name!r}: expected a (nested) list of numbers")
    try:
        value = np.array(raw, dtype=_DTYPES[dtype] if dtype else None)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(400, "bad_request", f"input {name!r}: not a rectangular array of numbers") from None
    if value.dtype.kind not in "fiub":
        raise RequestError(400, "bad_request", f"input {name!r}: not an array of numbers")
    if shape is not None:
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)) or math.prod(shape) != value.size:
            raise RequestError(400, "bad_request", f"input {name!r}: shape {str(shape)[:40]} does not hold "
                                                   f"{value.size} values")
        value = value.reshape(shape)
    return value


def parse_feeds(body: bytes, content_type: str, session: Session) -> dict[str, np.ndarray]:
    """The request body as the session's feeds; every way it can be wrong is a RequestError."""
    specs = {s.name: s for s in session.inputs}
    if content_type.split(";")[0].strip() == NPY:
        if len(specs) != 1:
            raise RequestError(400, "bad_request", f"a .npy body feeds a model of one input; this one takes "
                                                   f"{sorted(specs)}: send JSON")
        try:
            value = read_npy(body)
        except ValueError as exc:
            raise RequestError(400, "bad_request", f"the body is not a .npy array this API takes: {exc}") from None
        [spec] = specs.values()
        return {spec.name: check_input(spec, np.asarray(value))}
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(400, "bad_request", "the body is neither JSON nor .npy (Content-Type: "
                                               f"application/json or {NPY})") from None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, dict):
        raise RequestError(400, "bad_request", 'expected {"inputs": {NAME: TENSOR}}; the model takes '
                                               f"{sorted(specs)}")
    missing, extra = sorted(set(specs) - set(inputs)), sorted(set(inputs) - set(specs))
    if missing or extra:
        raise RequestError(400, "bad_request", f"inputs {sorted(inputs)[:8]}: the model takes {sorted(specs)}"
                                               + (f" (missing {missing})" if missing else "")
                                               + (f" (unknown {extra[:8]})" if extra else ""))
    return {name: check_input(specs[name], _tensor(name, inputs[name])) for name in specs}
