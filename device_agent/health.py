"""Health check before activation: golden vectors must match, latency and memory must fit."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import HealthCheckError
from .manifest import Manifest
from .procstat import rss_mb
from .runtimes import Session


@dataclass(frozen=True)
class Benchmark:
    latency_ms_p50: float
    latency_ms_p95: float
    rss_mb: float
    runs: int
    latency_ms_p99: float = 0.0
    throughput_ips: float = 0.0  # inferences per second, back to back


def benchmark(session: Session, feeds: dict[str, np.ndarray], runs: int, warmup: int = 5) -> Benchmark:
    for _ in range(warmup):
        session.run(feeds)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(feeds)
        times[i] = (time.perf_counter() - t0) * 1e3
    return Benchmark(
        latency_ms_p50=round(float(np.percentile(times, 50)), 4),
        latency_ms_p95=round(float(np.percentile(times, 95)), 4),
        rss_mb=round(rss_mb(), 2),
        runs=runs,
        latency_ms_p99=round(float(np.percentile(times, 99)), 4),
        throughput_ips=round(1e3 * runs / float(times.sum()), 1),
    )


def check_golden(session: Session, manifest: Manifest) -> int:
    """Run every golden case; collect all mismatches and raise once. Returns the case count.

    The manifest's ``golden`` section says how close is close enough: ``atol``/``rtol`` (float models),
    and for a quantized model ``quantized.atol`` per output, derived on the host from the model's own
    quantization steps (a device's integer kernels may round any activation to its neighbouring level;
    see ``pipeline/bundle/golden.py``). For a classifier's output a mismatch also says whether the
    predicted classes agree, which tells noise in the numbers from a wrong model.
    """
    pairs = manifest.golden_pairs()
    if not pairs:
        raise HealthCheckError("manifest carries no golden vectors; the host must include at least one case")
    atol, rtol, q_atol = tolerances(manifest.golden)
    problems = []
    for i, (inputs, expected) in enumerate(pairs):
        got = session.run(inputs)
        if len(got) != len(expected):
            problems.append(f"case {i}: {len(got)} outputs, expected {len(expected)}")
            continue
        for j, (g, e) in enumerate(zip(got, expected)):
            tol = max(atol, q_atol[j]) if j < len(q_atol) else atol
            problem = _compare(g, e, tol, rtol)
            if problem:
                problems.append(f"case {i} output {j}: {problem}")
    if problems:
        raise HealthCheckError("golden vectors do not match:\n  " + "\n  ".join(problems))
    return len(pairs)


def tolerances(golden: dict) -> tuple[float, float, list[float]]:
    """(atol, rtol, per-output atol of a quantized model) from a manifest's golden section."""
    quantized = golden.get("quantized")
    per_output = quantized.get("atol") if isinstance(quantized, dict) else None
    q_atol = [float(a) if isinstance(a, (int, float)) else 0.0 for a in per_output] \
        if isinstance(per_output, list) else []
    return float(golden.get("atol", 1e-4)), float(golden.get("rtol", 1e-3)), q_atol


def _compare(got: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> str | None:
    if got.shape != expected.shape:
        return f"shape {got.shape}, expected {expected.shape}"
    if np.allclose(got, expected, atol=atol, rtol=rtol):
        return None
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    problem = f"max abs diff {diff:.3g} > atol {atol:.3g} (rtol {rtol:g})"
    if expected.ndim == 2 and expected.shape[1] > 1:
        same = bool(np.array_equal(got.argmax(1), expected.argmax(1)))
        problem += " (predicted classes agree)" if same else \
            f" (predicts class {got.argmax(1).tolist()}, expected {expected.argmax(1).tolist()})"
    return problem


def health_check(session: Session, manifest: Manifest, runs: int) -> Benchmark:
    check_golden(session, manifest)
    feeds = manifest.golden_pairs()[0][0]
    bench = benchmark(session, feeds, runs=max(runs, int(manifest.health.get("runs", 0))))
    problems = []
    max_latency = manifest.health.get("max_latency_ms")
    if max_latency is not None and bench.latency_ms_p95 > max_latency:
        problems.append(f"latency p95 {bench.latency_ms_p95:.3f} ms > limit {max_latency} ms")
    max_rss = manifest.health.get("max_rss_mb")
    if max_rss is not None and bench.rss_mb > max_rss:
        problems.append(f"resident memory {bench.rss_mb:.1f} MB > limit {max_rss} MB")
    if problems:
        raise HealthCheckError("health check failed: " + "; ".join(problems))
    return bench
