"""The fits: whole-model latencies to per-op-category factors (non-negative least squares on roofline
features), and the kernel-level predictor (single kernels timed in context, then a per-precision correction
fitted on whole random models)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...export import export_model, quantize_model
from ...targets import OpFactor, TargetProfile
from ..compare import steady_latency_ms
from ..predict import roofline_terms
from ..static import CATEGORIES
from .suite import calibration_models, kernel_configs, kernel_module, kernel_prefix


def features(profile, target: TargetProfile) -> np.ndarray:
    terms = roofline_terms(profile, target)
    row = [1.0]
    for cat in CATEGORIES:
        n, r = terms.get(cat, (0, 0.0))
        row += [float(n), r]
    return np.array(row)


def fit_factors(rows: list[np.ndarray], times_s: list[float]) -> tuple[float, dict[str, OpFactor], np.ndarray]:
    """NNLS, relative error weighting (each model counts equally, whatever its size)."""
    from scipy.optimize import nnls

    a, t = np.array(rows), np.array(times_s)
    w = 1 / t
    scale = np.maximum(np.abs(a).max(0), 1e-12)
    coef, _ = nnls(a / scale * w[:, None], t * w)
    coef = coef / scale
    factors = {}
    for i, cat in enumerate(CATEGORIES):
        overhead, factor = coef[1 + 2 * i], coef[2 + 2 * i]
        if a[:, 1 + 2 * i].any():
            factors[cat] = OpFactor(roofline_factor=round(float(factor), 4), overhead_us=round(float(overhead) * 1e6, 3))
    return float(coef[0]), factors, a @ coef


def measure_kernels(threads: int, tmp: Path, progress: Callable[[str], None], seed: int = 0,
                    scale: int = 1, probe=None, reference_ms: float | None = None) -> tuple[list[dict[str, Any]], float]:
    """Time each kernel in context; int8 versions of the compute kernels (quantized with their prefix).
    Every 20 kernels the speed reference is timed again and the samples are normalised to ``reference_ms``."""
    from dataclasses import replace

    configs = kernel_configs(seed, scale)
    samples, pending = [], []
    factor = 1.0
    for i, k in enumerate(configs):
        if probe is not None and i % 20 == 0:
            factor = reference_ms / probe.probe()
        torch.manual_seed(i)
        module, shape = kernel_module(k)
        prefix = kernel_prefix(k).eval()
        pre = export_model("onnx", prefix, shape, tmp / f"p{i}.onnx", 17)
        full = export_model("onnx", nn.Sequential(prefix, module).eval(), shape, tmp / f"k{i}.onnx", 17)
        variants = [(k, pre, full)]
        if k.kind in ("conv", "dwconv", "gemm") and (i % 2 == 0 or k.cin <= 3 or k.cout < 16):
            x = np.random.default_rng(i).random((4, *shape), dtype=np.float32)
            qargs = (x, x[:1], np.zeros(1, np.int64), 1.0)
            qpre, _ = quantize_model("int8-static", pre, tmp / f"p{i}q.onnx", *qargs)
            qfull, _ = quantize_model("int8-static", full, tmp / f"k{i}q.onnx", *qargs)
            variants.append((replace(k, int8=True), qpre, qfull))
        for kern, p_pre, p_full in variants:
            a = steady_latency_ms(p_pre, shape, threads, rounds=3, runs=30)
            b = steady_latency_ms(p_full, shape, threads, rounds=3, runs=30)
            samples.append({"kernel": kern.to_dict(), "us": round(max((b - a) * 1e3 * factor, 0.05), 3)})
        if (i + 1) % 50 == 0:
            progress(f"kernels measured: {i + 1}/{len(configs)}")
    del pending
    return samples, 0.0


def fit_kernel_predictor(threads: int, tmp: Path, models: int, progress: Callable[[str], None], scale: int = 1):
    """Kernel forests from isolated measurements, then a per-precision linear correction fitted on whole
    random models (feeds, fetches and boundary quantization are not in any single kernel). All timings
    are normalised to the speed reference's latency at the start, so a drift of the machine's speed
    during calibration does not bend the fit."""
    from scipy.optimize import nnls

    from ..compare import SpeedProbe
    from ..kernels import KernelPredictor

    probe = SpeedProbe(threads, tmp)
    reference_ms = probe.probe()
    samples, base_us = measure_kernels(threads, tmp, progress, scale=scale, probe=probe, reference_ms=reference_ms)
    predictor = KernelPredictor(samples)
    calib_x = np.random.default_rng(1).random((16, 1, 28, 28), dtype=np.float32)
    rows: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i, (name, model, shape) in enumerate(calibration_models(models, seed=100)):
        fp32 = export_model("onnx", model, shape, tmp / f"w{name}.onnx", 17)
        q, _ = quantize_model("int8-static", fp32, tmp / f"w{name}q.onnx", calib_x, calib_x[:1],
                              np.zeros(1, np.int64), 1.0)
        factor = reference_ms / probe.probe()
        for key, path in (("fp32", fp32), ("int8", q)):
            rows[key].append(predictor.kind_sums_us(path)[0])
            times[key].append(steady_latency_ms(path, shape, threads) * 1e3 * factor)
    correction, errors = {}, []
    for key in rows:
        a, t = np.array(rows[key]), np.array(times[key])
        w = 1 / t
        scale = np.maximum(a.max(0), 1e-9)
        coef, _ = nnls(a / scale * w[:, None], t * w)
        coef = coef / scale
        correction[key] = [round(float(c), 5) for c in coef]
        errors += list(np.abs(a @ coef - t) / t)
    predictor.correction = correction
    err = np.array(errors)
    predictor.reference_ms = round(reference_ms, 5)
    return predictor, {"kernels": len(samples), "reference_ms": round(reference_ms, 5), "models": len(err),
                       "median_abs_error_pct": round(float(np.median(err) * 100), 2),
                       "within_10pct": round(float((err <= 0.1).mean()), 3)}
