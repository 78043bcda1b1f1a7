"""Compare the latency of model variants fairly on a noisy machine: interleave them (A B A B ...) in
rounds, take per-round ratios against the first variant, report the median and the spread."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare_latency(paths: list[Path], input_shape: tuple[int, ...], threads: int = 1, rounds: int = 7,
                    runs: int = 100, warmup: int = 20) -> list[dict[str, Any]]:
    """Median latency per variant and its speedup over ``paths[0]`` (median of per-round ratios)."""
    sessions = [_session(p, threads) for p in paths]
    x = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    medians = np.zeros((rounds, len(paths)))
    for r in range(rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = np.empty(runs)
            for k in range(runs):
                t0 = time.perf_counter()
                s.run(None, f)
                t[k] = time.perf_counter() - t0
            medians[r, i] = np.median(t) * 1e3
    ratios = medians[:, :1] / medians
    return [{"path": str(p), "latency_ms": round(float(np.median(medians[:, i])), 4),
             "speedup": round(float(np.median(ratios[:, i])), 3),
             "speedup_spread": [round(float(ratios[:, i].min()), 3), round(float(ratios[:, i].max()), 3)],
             "threads": threads} for i, p in enumerate(paths)]


def steady_latency_ms(path: Path, input_shape: tuple[int, ...], threads: int, rounds: int = 5, runs: int = 40,
                      warmup: int = 10) -> float:
    """The machine's steady latency for one model: the lowest of several round medians.

    These machines shift between speed levels over seconds; the lowest round median is the figure
    that repeats (the same model measured again lands within a few percent), where a single median
    or a mean carries the shift.
    """
    s = _session(path, threads)
    x = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(warmup):
        s.run(None, feed)
    best = float("inf")
    for _ in range(rounds):
        t = np.empty(runs)
        for k in range(runs):
            t0 = time.perf_counter()
            s.run(None, feed)
            t[k] = time.perf_counter() - t0
        best = min(best, float(np.median(t)))
    return best * 1e3


class SpeedProbe:
    """This machine's current speed, from a fixed reference model timed now.

    Shared machines drift between speed levels for seconds to minutes; timing the reference next to
    each measurement lets figures taken at different moments be compared (``normalise``)."""

    def __init__(self, threads: int, tmp: Path) -> None:
        import torch
        from torch import nn

        from ..export import export_model

        torch.manual_seed(1234)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(32, 10)).eval()
        self.shape = (1, 28, 28)
        self.path = export_model("onnx", model, self.shape, tmp / "speed-reference.onnx", 17)
        self.threads = threads

    def probe(self) -> float:
        return steady_latency_ms(self.path, self.shape, self.threads, rounds=3, runs=30)
