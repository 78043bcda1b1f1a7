"""The result as a target: this machine's TargetProfile, written as host.yaml (with a header that says how it
was measured) into the user targets directory, its kernel measurements beside it."""

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


def host_profile(peaks: dict[str, float], threads: int) -> TargetProfile:
    from device_agent.runtimes import available_runtimes

    from ...targets import Budgets
    from ...targets import Cpu, Efficiency, Memory, Power

    return TargetProfile(
        name="host", description=f"this machine: {cpu_model()}", arch=normal_arch(platform.machine()),
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
