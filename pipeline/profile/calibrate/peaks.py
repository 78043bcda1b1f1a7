"""This machine's facts and peak rates: CPU model and clock from the OS, then onnxruntime's fp32 convolution
rate, the int8 (QDQ) rate of the same convolution, and memory bandwidth (a large copy)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from ...export import export_model, quantize_model


def cpu_clock_ghz() -> float:
    freq = psutil.cpu_freq()
    if freq and (freq.max or freq.current):
        return round((freq.max or freq.current) / 1000, 3)
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.lower().startswith("cpu mhz")]
        return round(max(mhz) / 1000, 3)
    except (OSError, ValueError):
        return 1.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn: Callable[[], Any], min_s: float = 0.3) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_s / 5:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _session(path: Path, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def measure_peaks(threads: int, tmp: Path) -> dict[str, float]:
    """fp32 GFLOP/s of a large convolution, int8 GOP/s of its QDQ version, copy bandwidth GB/s."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1)).eval()
    shape = (128, 28, 28)
    macs = 256 * 128 * 9 * 28 * 28
    fp32 = export_model("onnx", conv, shape, tmp / "peak.onnx", 17)
    x = np.random.default_rng(0).random((8, *shape), dtype=np.float32)
    int8, _ = quantize_model("int8-static", fp32, tmp / "peak-int8.onnx", x, x[:1], np.zeros(1, np.int64), 1.0)
    out = {}
    for key, path in (("gflops_fp32", fp32), ("gops_int8", int8)):
        s = _session(path, threads)
        feed = {s.get_inputs()[0].name: x[:1]}
        out[key] = round(2 * macs / _time(lambda: s.run(None, feed)) / 1e9, 2)
    a = np.ones(32 * 2**20, dtype=np.float32)  # 128 MiB: far beyond the caches
    b = np.empty_like(a)
    out["bandwidth_gbs"] = round(2 * a.nbytes / _time(lambda: np.copyto(b, a)) / 1e9, 2)  # read + write
    return out
