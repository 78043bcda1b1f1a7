"""Does the exported model compute what the PyTorch model computes? Numbers, not hopes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from device_agent.runtimes.onnxruntime_backend import Int8Semantics, session_options

from ..errors import ExportError


def ort_session(path: Path, threads: int | None = None, int8: Int8Semantics = Int8Semantics.REFERENCE):
    """An onnxruntime session; by default with the reference int8 semantics (QDQ run as written, no fused
    integer kernels), so what it computes for a quantized model does not depend on this host's CPU."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, int8), providers=["CPUExecutionProvider"])


def ort_predict(path: Path, x: np.ndarray, batch_size: int = 256,
                int8: Int8Semantics = Int8Semantics.REFERENCE) -> np.ndarray:
    """Outputs of a model file for ``x``, run by the device agent's runtime for its format (.onnx, .tflite);
    ``int8``: reference semantics (the target's numbers, on any host) or this host's integer kernels."""
    if path.suffix != ".onnx":
        return runtime_predict(path, x)
    sess = ort_session(path, int8=int8)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def runtime_predict(path: Path, x: np.ndarray) -> np.ndarray:
    from device_agent.runtimes import get_runtime, runtime_for

    session = get_runtime(runtime_for(path)).load(path)
    name = session.inputs[0].name
    return np.concatenate([session.run({name: x[i:i + 1]})[0] for i in range(len(x))])


@torch.no_grad()
def torch_predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model = model.cpu().eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; ~20+ dB keeps classification intact)."""
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else round(10 * np.log10(signal / noise), 2)


def check_parity(model: nn.Module, path: Path, x: np.ndarray, y: np.ndarray, atol: float) -> dict[str, Any]:
    """Compare the exported model (ONNX Runtime or TFLite) with PyTorch on the test set; raise once listing
    every output that differs."""
    ref = torch_predict(model, x)
    got = ort_predict(path, x)
    problems = []
    if ref.shape != got.shape:
        problems.append(f"output 0 (logits): shape {got.shape} vs PyTorch {ref.shape}")
        diff = float("inf")
    else:
        diff = float(np.max(np.abs(ref - got)))
        if diff > atol:
            problems.append(f"output 0 (logits): max abs diff {diff:.3g} > tolerance {atol:g}")
    acc_torch = float((ref.argmax(1) == y).mean())
    acc_onnx = float((got.argmax(1) == y).mean()) if ref.shape == got.shape else 0.0
    if problems:
        raise ExportError(f"{path.name} does not match the PyTorch model:\n  " + "\n  ".join(problems))
    return {"max_abs_diff": diff, "atol": atol, "accuracy_torch": acc_torch, "accuracy_onnx": acc_onnx,
            "samples": len(x)}
