"""``pipeline targets calibrate``: measure this machine and write it as a target (host.yaml).

It is written into the user directory (``pipeline.targets.user_dir()``: ``$EDGEFLEET_TARGETS_DIR``, else
``~/.config/edgefleet/targets``), where it overrides the packaged host.yaml; never into the installation.

1. Facts: cores, clock, RAM, storage from the OS.
2. Micro-benchmarks with onnxruntime: fp32 GEMM rate, int8 (QDQ) convolution rate, memory
   bandwidth (a large copy), at the thread count the target will be profiled with.
3. Op factors: a seeded family of small random CNNs and MLPs (fp32 and int8), each exported to ONNX
   and timed; a non-negative least-squares fit of latency = session overhead + sum over op
   categories of (nodes x overhead + factor x roofline time) gives each category's overhead and
   roofline factor. The fit's own error on the calibration set is reported.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from ...export import export_model, quantize_model
from ...targets import OpFactor, TargetProfile, user_dir
from ..compare import steady_latency_ms
from ..predict import roofline_terms
from ..static import CATEGORIES, analyse
from .peaks import cpu_clock_ghz, cpu_model, measure_peaks
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


def calibrate(threads: int | None = None, models: int = 32, progress: Callable[[str], None] = print,
              kernel_scale: int = 4) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="calibrate-"))
    try:
        progress(f"micro-benchmarks at {threads} thread(s)")
        peaks = measure_peaks(threads, tmp)
        progress(f"fp32 {peaks['gflops_fp32']} GFLOP/s, int8 {peaks['gops_int8']} GOP/s, "
                 f"copy {peaks['bandwidth_gbs']} GB/s")
        host = host_profile(peaks, threads)
        rows, times, names = [], [], []
        calib_x = np.random.default_rng(1).random((16, 1, 28, 28), dtype=np.float32)
        for i, (name, model, shape) in enumerate(calibration_models(models)):
            fp32 = export_model("onnx", model, shape, tmp / f"{name}.onnx", 17)
            variants = [(name, fp32)]
            if i % 2 == 0:
                q, _ = quantize_model("int8-static", fp32, tmp / f"{name}-int8.onnx", calib_x, calib_x[:1],
                                      np.zeros(1, np.int64), 1.0)
                variants.append((f"{name}-int8", q))
            for vname, path in variants:
                rows.append(features(analyse(path), host))
                times.append(steady_latency_ms(path, shape, threads) / 1e3)
                names.append(vname)
            progress(f"calibration model {i + 1}/{models}: {name}")
        session, factors, fitted = fit_factors(rows, times)
        err = np.abs(fitted - np.array(times)) / np.array(times)
        kernels, kernel_fit = None, None
        if kernel_scale:
            progress("kernel-level predictor: timing single kernels in context")
            kernels, kernel_fit = fit_kernel_predictor(threads, tmp, max(models, 4), progress, kernel_scale)
            progress(f"kernel predictor: {kernel_fit['kernels']} kernels; on {kernel_fit['models']} whole models "
                     f"median error {kernel_fit['median_abs_error_pct']}%, {kernel_fit['within_10pct']:.0%} within 10%")
        return {"peaks": peaks, "threads": threads, "session_overhead_us": round(session * 1e6, 3),
                "kernels": kernels, "kernel_fit": kernel_fit,
                "ops": {k: v.model_dump() for k, v in factors.items()},
                "fit": {"models": len(times), "median_abs_error_pct": round(float(np.median(err) * 100), 2),
                        "within_10pct": round(float((err <= 0.1).mean()), 3)},
                "host": host}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def host_profile(peaks: dict[str, float], threads: int) -> TargetProfile:
    from device_agent.runtimes import available_runtimes

    from ...targets import Budgets
    from ...targets import Cpu, Efficiency, Memory, Power

    return TargetProfile(
        name="host", description=f"this machine: {cpu_model()}", arch=platform.machine(),
        cpu=Cpu(core=cpu_model(), cores=threads, clock_ghz=cpu_clock_ghz(), peak_gflops_fp32=peaks["gflops_fp32"],
                peak_gops_int8=peaks["gops_int8"]),
        memory=Memory(ram_mb=round(psutil.virtual_memory().total / 2**20), bandwidth_gbs=peaks["bandwidth_gbs"]),
        storage_mb=round(shutil.disk_usage("/").total / 2**20), power=Power(idle_w=10.0, active_w=15.0 * threads),
        runtimes=available_runtimes(), efficiency=Efficiency(fp32=1.0, int8=1.0, per_op_overhead_us=5.0),
        runtime_overhead_mb=45.0, budgets=Budgets(latency_ms=50, peak_memory_mb=1024, model_size_mb=64, energy_mj=1000),
    )


def write_host_yaml(result: dict[str, Any], path: Path | None = None) -> Path:
    """``path``: by default ``host.yaml`` in the user directory, created if need be."""
    import yaml

    path = path or user_dir() / "host.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)

    h: TargetProfile = result["host"]
    conv = result["ops"].get("conv", {}).get("roofline_factor") or 1.0
    data = h.model_dump()
    data["efficiency"] = {"fp32": round(min(1.0, 1 / conv), 4), "int8": round(min(1.0, 1 / conv), 4),
                          "per_op_overhead_us": round(float(np.median([o["overhead_us"] for o in result["ops"].values()])), 3),
                          "session_overhead_us": result["session_overhead_us"], "ops": result["ops"]}
    today = dt.date.today().isoformat()
    header = (
        f"# This machine, measured by `pipeline targets calibrate` on {today} ({result['threads']} thread(s)).\n"
        f"# cpu.peak_*: achieved by onnxruntime on a 128->256 3x3 convolution at 28x28 (fp32, and its int8 QDQ\n"
        f"#   version); memory.bandwidth_gbs: a 128 MiB copy (read + write) with numpy.\n"
        f"# efficiency.ops: per op category, latency = overhead_us + roofline_factor x roofline time, fitted by\n"
        f"#   non-negative least squares on {result['fit']['models']} seeded random CNN/MLP models (fp32 and int8);\n"
        f"#   fit error on them: median {result['fit']['median_abs_error_pct']}%, "
        f"{result['fit']['within_10pct']:.0%} within 10%.\n"
        f"# power: no energy counter on this machine; an estimate of {h.power.active_w:g} W for "
        f"{result['threads']} busy core(s) - edit if you know better.\n"
        f"# Re-run `pipeline targets calibrate` after moving to another machine.\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    if result.get("kernels") is not None:
        result["kernels"].save(kernels_path(path), {**result["kernel_fit"], "threads": result["threads"],
                                                    "date": today})
    return path


def kernels_path(target_yaml: Path) -> Path:
    """Where a calibrated target keeps its kernel measurements: beside its YAML."""
    return target_yaml.with_name(target_yaml.stem + ".kernels.json")


# --------------------------------------------------------------------------- kernel-level calibration


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
