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

``peaks`` measures the machine, ``suite`` builds what is timed (random models, single kernels), ``fit`` fits
the factors and the kernel-level predictor, ``write`` turns the result into host.yaml; ``calibrate`` runs them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...export import export_model, quantize_model
from ..compare import steady_latency_ms
from ..static import analyse
from .fit import features, fit_factors, fit_kernel_predictor, measure_kernels
from .peaks import cpu_clock_ghz, cpu_model, measure_peaks
from .suite import calibration_models, kernel_configs, kernel_module, kernel_prefix
from .write import host_profile, kernels_path, write_host_yaml

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


__all__ = ["calibrate", "calibration_models", "cpu_clock_ghz", "cpu_model", "features", "fit_factors",
           "fit_kernel_predictor", "host_profile", "kernel_configs", "kernel_module", "kernel_prefix", "kernels_path",
           "measure_kernels", "measure_peaks", "write_host_yaml"]
