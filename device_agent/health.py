"""Health check before activation: golden vectors must match, latency and memory must fit."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import psutil

from .errors import HealthCheckError
from .manifest import Manifest
from .runtimes import Session


@dataclass(frozen=True)
class Benchmark:
    latency_ms_p50: float
    latency_ms_p95: float
    rss_mb: float
    runs: int
    latency_ms_p99: float = 0.0
    throughput_ips: float = 0.0  # inferences per second, back to back


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


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
    """Run every golden case; collect all mismatches and raise once. Returns the case count."""
    pairs = manifest.golden_pairs()
    if not pairs:
        raise HealthCheckError("manifest carries no golden vectors; the host must include at least one case")
    atol = float(manifest.golden.get("atol", 1e-4))
    rtol = float(manifest.golden.get("rtol", 1e-3))
    problems = []
    for i, (inputs, expected) in enumerate(pairs):
        got = session.run(inputs)
        if len(got) != len(expected):
            problems.append(f"case {i}: {len(got)} outputs, expected {len(expected)}")
            continue
        for j, (g, e) in enumerate(zip(got, expected)):
            if g.shape != e.shape:
                problems.append(f"case {i} output {j}: shape {g.shape}, expected {e.shape}")
            elif not np.allclose(g, e, atol=atol, rtol=rtol):
                diff = float(np.max(np.abs(g.astype(np.float64) - e)))
                problems.append(f"case {i} output {j}: max abs diff {diff:.3g} > atol {atol:g} (rtol {rtol:g})")
    if problems:
        raise HealthCheckError("golden vectors do not match:\n  " + "\n  ".join(problems))
    return len(pairs)


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
