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
    return ort_run(ort_session(path, int8=int8), x, batch_size)[0]


def ort_run(sess, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of an onnxruntime session for ``x``, in batches. A model whose batch dimension is fixed (the
    usual export: 1) is fed batches of exactly that size, the last one padded with zeros and trimmed after."""
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch_size
    batches = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        pad = step - len(chunk) if fixed else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs = sess.run(None, {inp.name: chunk})
        batches.append([o[:len(o) - pad] if pad else o for o in outs])
    return [np.concatenate([b[k] for b in batches]) for k in range(len(batches[0]))]


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


def check_parity(reference: nn.Module | Path, path: Path, x: np.ndarray, y: np.ndarray,
                 atol: float) -> dict[str, Any]:
    """Compare every output of the model file at ``path`` (run by its format's backend) with the reference's on
    the test set, by position and name: the reference is the PyTorch model it was exported from, or the user's
    own model file it was transformed from (simplified, quantized). Collect every output that differs, then
    raise once, one line per output."""
    from .backend import backend_for_file

    if isinstance(reference, Path):
        against, key = f"the original {reference.name}", "accuracy_original"
        ref = list(backend_for_file(reference).run(reference, x).values())
    else:
        against, key = "the PyTorch model", "accuracy_torch"
        ref = torch_outputs(reference, x)
    got = backend_for_file(path).run(path, x)
    problems = []
    if len(got) != len(ref):
        problems.append(f"outputs: {path.name} has {len(got)} ({', '.join(got)}), {against} {len(ref)}")
    diffs: dict[str, float] = {}
    for i, (name, out) in enumerate(got.items()):
        if i >= len(ref):
            break
        if ref[i].shape != out.shape:
            problems.append(f"output {i} ({name}): shape {out.shape} vs {against} {ref[i].shape}")
            diffs[name] = float("inf")
            continue
        diffs[name] = float(np.max(np.abs(ref[i].astype(np.float64) - out))) if out.size else 0.0
        if diffs[name] > atol:
            problems.append(f"output {i} ({name}): max abs diff {diffs[name]:.3g} > tolerance {atol:g}")
    if problems:
        raise ExportError(f"{path.name} does not match {against}:\n  " + "\n  ".join(problems))
    first = next(iter(got.values()))
    return {"max_abs_diff": max(diffs.values()), "atol": atol, "outputs": diffs, "against": against,
            key: accuracy(ref[0], y), "accuracy_onnx": accuracy(first, y), "samples": len(x)}


def accuracy(scores: np.ndarray, y: np.ndarray) -> float | None:
    """Top-1 accuracy of a classifier's scores (batch x classes); None when the output is not that shape or there
    are no labels to judge it by."""
    if scores.ndim != 2 or len(y) != len(scores) or not len(y):
        return None
    return float((scores.argmax(1) == y).mean())
