"""The result as files in the user targets directory (``pipeline.targets.user_dir()``, never the installation):
``<target>.kernels.json`` (the kernel measurements, the predictor's correction and the calibration's provenance)
for every class, and for ``host`` also ``host.yaml`` (this machine as a target, with its calibrated op factors
and a header that says how it was measured)."""

from __future__ import annotations

import datetime as dt
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from ...targets import TargetProfile, normal_arch, user_dir
from .peaks import cpu_clock_ghz, cpu_model


def host_profile(peaks: dict[str, float], threads: int, base: TargetProfile | None = None) -> TargetProfile:
    """This machine as a target: its facts from the OS, its rates as its agent measured them (``peaks``; a rate
    that did not come back is ``base``'s)."""
    from device_agent.runtimes import available_runtimes

    from ...targets import Budgets, Cpu, Efficiency, Memory, Power

    def rate(key: str, fallback: float | None) -> float:
        value = peaks.get(key) or fallback
        if not value:
            raise ValueError(f"no measured {key} and no earlier figure to keep")
        return float(value)

    return TargetProfile(
        name="host", description=f"this machine: {cpu_model()}", arch=normal_arch(platform.machine()),
        cpu=Cpu(core=cpu_model(), cores=threads, clock_ghz=cpu_clock_ghz(),
                peak_gflops_fp32=rate("gflops_fp32", base and base.cpu.peak_gflops_fp32),
                peak_gops_int8=rate("gops_int8", base and base.cpu.peak_gops_int8)),
        memory=Memory(ram_mb=round(psutil.virtual_memory().total / 2**20),
                      bandwidth_gbs=rate("bandwidth_gbs", base and base.memory.bandwidth_gbs)),
        storage_mb=round(shutil.disk_usage("/").total / 2**20), power=Power(idle_w=10.0, active_w=15.0 * threads),
        runtimes=available_runtimes(), efficiency=Efficiency(fp32=1.0, int8=1.0, per_op_overhead_us=5.0),
        runtime_overhead_mb=45.0, budgets=base.budgets if base else Budgets(latency_ms=50, peak_memory_mb=1024,
                                                                             model_size_mb=64, energy_mj=1000),
    )


def write_host_yaml(result: dict[str, Any], path: Path | None = None) -> Path:
    """``result``: {host: TargetProfile, threads, ops, session_overhead_us, fit, devices?}. ``path``: by default
    ``host.yaml`` in the user directory, created if need be."""
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
    via = f" through {', '.join(result['devices'])}" if result.get("devices") else ""
    header = (
        f"# This machine, measured by `pipeline targets calibrate --target host` on {today}{via} "
        f"({result['threads']} thread(s)).\n"
        f"# cpu.peak_*: achieved by onnxruntime on a 128->256 3x3 convolution at 28x28 (fp32, and its int8 QDQ\n"
        f"#   version); memory.bandwidth_gbs: a ReLU over 32 MiB in onnxruntime (read + write).\n"
        f"# efficiency.ops: per op category, latency = overhead_us + roofline_factor x roofline time, fitted by\n"
        f"#   non-negative least squares on {result['fit']['models']} seeded random CNN/MLP models (fp32 and int8);\n"
        f"#   fit error on them: median {result['fit']['median_abs_error_pct']}%, "
        f"{result['fit']['within_10pct']:.0%} within 10%.\n"
        f"# power: no energy counter on this machine; an estimate of {h.power.active_w:g} W for "
        f"{result['threads']} busy core(s) - edit if you know better.\n"
        f"# Re-run `pipeline targets calibrate --target host` after moving to another machine.\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def kernels_path(target: str, directory: Path | None = None) -> Path:
    """Where a class's kernel measurements are written: ``<target>.kernels.json`` in the user directory."""
    return (directory or user_dir()) / f"{target}.kernels.json"


def write_kernels(predictor, target: str, meta: dict[str, Any], directory: Path | None = None) -> Path:
    """The predictor's samples and correction with ``meta`` (its fit and provenance)."""
    path = kernels_path(target, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    predictor.save(path, meta)
    return path
