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

from ...export import export_model, quantize_model
from ...targets import TargetProfile, user_dir
from ..compare import steady_latency_ms
from ..static import analyse
from .fit import features, fit_factors, fit_kernel_predictor, measure_kernels
from .peaks import cpu_clock_ghz, cpu_model, measure_peaks
from .suite import calibration_models, kernel_configs, kernel_module, kernel_prefix


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
