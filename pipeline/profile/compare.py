"""Compare the latency of model variants fairly on a noisy machine: interleave them (A B, B A, ...) in
rounds, take per-round ratios against the first variant, report the median, its interval and the spread. How
many rounds, and how many runs in each, adapt to the models' latency and to the spread (:class:`Adaptive`).

A round's figure for a variant is the one a calibrating device takes (``device_agent.suite_runner.round_figure_ms``:
a low percentile of the round's runs, since interference only adds time), and a variant's latency the median of its
round figures, as a device reports a calibration case: predictions fitted on what devices measured are checked
here against the same statistic."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.suite_runner import round_figure_ms


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Adaptive:
    """How long a comparison runs when it adapts to the models: each round times every variant for about
    ``round_s`` seconds; rounds go on until the ~95% interval of every median ratio is within ``rel_ci`` of the
    median (after ``min_rounds``), or ``budget_s`` or ``max_rounds`` is reached."""

    round_s: float = 0.05
    min_rounds: int = 5
    max_rounds: int = 60
    budget_s: float = 15.0
    rel_ci: float = 0.03
    min_runs: int = 3
    max_runs: int = 500


def median_ci(values: np.ndarray) -> tuple[float, float]:
    """A distribution-free ~95% interval for the median: order statistics n/2 -+ 0.98 sqrt(n)."""
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    half = 0.98 * np.sqrt(n)
    lo, hi = int(np.floor(n / 2 - half)), int(np.ceil(n / 2 + half))
    return float(v[max(lo, 0)]), float(v[min(hi, n - 1)])


def _time(session, feed, runs: int) -> float:
    t = np.empty(runs)
    for k in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        t[k] = time.perf_counter() - t0
    return round_figure_ms(t)


def compare_latency(paths: list[Path], input_shape: tuple[int, ...], threads: int = 1, rounds: int | None = None,
                    runs: int | None = None, warmup: int | None = None,
                    adaptive: Adaptive | None = None) -> list[dict[str, Any]]:
    """Latency per variant (the median of its round figures, see the module's docstring) and its speedup over
    ``paths[0]`` (median of per-round ratios).

    By default the rounds adapt to the models (:class:`Adaptive`): runs per round from each model's latency,
    rounds until the speedups' intervals are tight or the time budget is spent. ``rounds`` and ``runs`` fix them
    instead. Variants are interleaved within a round, in alternating order, so a drift of the machine's speed
    cancels out of the ratios."""
    policy = adaptive or Adaptive()
    fixed = rounds is not None or runs is not None
    started = time.perf_counter()
    sessions = [_session(p, threads) for p in paths]
    x = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    per_round = []
    for s, f in zip(sessions, feeds):
        if warmup is not None:
            for _ in range(warmup):
                s.run(None, f)
            per_round.append(runs or 100)
            continue
        n, t0 = 0, time.perf_counter()  # warm up for ~round_s (3 runs at least), which also gives the latency
        while n < 3 or (time.perf_counter() - t0 < policy.round_s and n < policy.max_runs):
            s.run(None, f)
            n += 1
        latency = (time.perf_counter() - t0) / n
        per_round.append(runs or int(np.clip(policy.round_s / latency, policy.min_runs, policy.max_runs)))
    medians: list[list[float]] = []
    order = list(range(len(paths)))
    while True:
        row = [0.0] * len(paths)
        for i in (order if len(medians) % 2 == 0 else order[::-1]):
            row[i] = _time(sessions[i], feeds[i], per_round[i]) * 1e3
        medians.append(row)
        done = len(medians)
        if fixed:
            if done >= (rounds or 7):
                break
            continue
        if done < policy.min_rounds:
            continue
        m = np.array(medians)
        series = [m[:, 0]] if len(paths) == 1 else [m[:, 0] / m[:, i] for i in range(1, len(paths))]
        tight = all((hi - lo) <= policy.rel_ci * float(np.median(r)) for r in series for lo, hi in [median_ci(r)])
        if tight or done >= policy.max_rounds or time.perf_counter() - started >= policy.budget_s:
            break
    m = np.array(medians)
    ratios = m[:, :1] / m
    wall = round(time.perf_counter() - started, 2)
    out = []
    for i, p in enumerate(paths):
        lo, hi = median_ci(ratios[:, i])
        out.append({"path": str(p), "latency_ms": round(float(np.median(m[:, i])), 4),
                    "speedup": round(float(np.median(ratios[:, i])), 3),
                    "latency_spread_ms": [round(float(m[:, i].min()), 4), round(float(m[:, i].max()), 4)],
                    "speedup_spread": [round(float(ratios[:, i].min()), 3), round(float(ratios[:, i].max()), 3)],
                    "speedup_ci": [round(lo, 3), round(hi, 3)], "rounds": len(medians), "runs": per_round[i],
                    "threads": threads, "wall_s": wall})
    return out


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
