"""Does the exported model compute what the PyTorch model computes? Numbers, not hopes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.runtimes.onnxruntime_backend import Int8Semantics, session_options

from ..errors import ExportError

if TYPE_CHECKING:
    from torch import nn


def ort_session(path: Path, threads: int | None = None, int8: Int8Semantics = Int8Semantics.REFERENCE):
    """An onnxruntime session; by default with the reference int8 semantics (QDQ run as written, no fused
    integer kernels), so what it computes for a quantized model does not depend on this host's CPU."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, int8), providers=["CPUExecutionProvider"])


def ort_predict(path: Path, x: np.ndarray, batch_size: int = 256,
                int8: Int8Semantics = Int8Semantics.REFERENCE) -> np.ndarray:
    """The first output of a model file for ``x``: ONNX through onnxruntime (``int8``: reference semantics,
    the target's numbers on any host, or this host's integer kernels), another format through its backend."""
    from .backend import backend_for_file
    from .formats import format_of_file

    if format_of_file(path).name != "onnx":
        return next(iter(backend_for_file(path).run(path, x).values()))
    sess = ort_session(path, int8=int8)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def torch_predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The PyTorch model's first output for ``x``."""
    return torch_outputs(model, x, batch_size)[0]


def torch_outputs(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of the PyTorch model for ``x``, in order (a tensor, a tuple or list, or a dict's values)."""
    import torch

    def flat(out) -> list[np.ndarray]:
        if isinstance(out, dict):
            out = list(out.values())
        return [t.numpy() for t in out] if isinstance(out, (tuple, list)) else [out.numpy()]

    model = model.cpu().eval()
    with torch.no_grad():
        batches = [flat(model(torch.from_numpy(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)]
    return [np.concatenate([b[k] for b in batches]) for k in range(len(batches[0]))]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; ~20+ dB keeps classification intact)."""
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else round(10 * np.log10(signal / noise), 2)


def check_parity(model: nn.Module, path: Path, x: np.ndarray, y: np.ndarray, atol: float) -> dict[str, Any]:
    """Compare every output of the exported model (run by its format's backend) with PyTorch's on the test
    set, by name: the file's outputs in order against the PyTorch model's. Collect every output that
    differs, then raise once, one line per output."""
    from .backend import backend_for_file

    ref = torch_outputs(model, x)
    got = backend_for_file(path).run(path, x)
    problems = []
    if len(got) != len(ref):
        problems.append(f"outputs: {path.name} has {len(got)} ({', '.join(got)}), the PyTorch model {len(ref)}")
    diffs: dict[str, float] = {}
    for i, (name, out) in enumerate(got.items()):
        if i >= len(ref):
            break
        if ref[i].shape != out.shape:
            problems.append(f"output {i} ({name}): shape {out.shape} vs PyTorch {ref[i].shape}")
            diffs[name] = float("inf")
            continue
        diffs[name] = float(np.max(np.abs(ref[i] - out))) if out.size else 0.0
        if diffs[name] > atol:
            problems.append(f"output {i} ({name}): max abs diff {diffs[name]:.3g} > tolerance {atol:g}")
    if problems:
        raise ExportError(f"{path.name} does not match the PyTorch model:\n  " + "\n  ".join(problems))
    first = next(iter(got.values()))
    return {"max_abs_diff": max(diffs.values()), "atol": atol, "outputs": diffs,
            "accuracy_torch": float((ref[0].argmax(1) == y).mean()),
            "accuracy_onnx": float((first.argmax(1) == y).mean()), "samples": len(x)}
