"""Profile a model file against a target: static figures, measured on this host, predicted for the target."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..targets import TargetProfile
from .budgets import BudgetRow, evaluate, failures
from .host import host_cpu
from .measure import measure_on_host
from .predict import predict
from .static import StaticProfile, analyse

HOST = "host"  # the target that describes this machine (written by `pipeline targets calibrate`)


@dataclass
class ProfileReport:
    target: str
    static: StaticProfile
    predicted: dict[str, Any]
    measured: dict[str, Any]
    budgets: list[BudgetRow]
    #: the CPU the measurements were taken on (arch, model, int8-relevant flags)
    host: dict[str, Any] = field(default_factory=host_cpu)

    @property
    def failures(self) -> list[str]:
        return failures(self.budgets)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "static": self.static.to_dict(), "predicted": self.predicted,
                "measured_on_host": self.measured, "host": self.host, "budgets": [r.to_dict() for r in self.budgets]}


def calibrated_host(target: TargetProfile) -> TargetProfile | None:
    """This machine's calibrated profile (targets/host.yaml), whose op factors transfer to targets of the same
    architecture only: factors fitted on an x86 core with AVX-512 say nothing of how a Cortex-A72 runs a
    depthwise convolution (transferred to rpi4, they priced MobileNetV2's 17 depthwise layers at 0.26 ms in
    all). Another architecture is predicted from its own published-anchored roofline."""
    from ..targets import known_targets, load_target, normal_arch

    if target.name == HOST or HOST not in known_targets():
        return None
    host = load_target(HOST)
    return host if normal_arch(host.arch) == normal_arch(target.arch) else None


def host_threads(target: TargetProfile) -> int:
    return max(1, min(target.cpu.cores, os.cpu_count() or 1))


def kernel_predictor(target: TargetProfile):
    """The kernel-level predictor of a target calibrated in person (``targets.kernels_file``: the user directory's
    <name>.kernels.json, else the one beside the YAML that defines the target), if any."""
    from ..targets import kernels_file
    from .kernels import KernelPredictor

    path = kernels_file(target.name)
    if path is None:
        return None
    cached = _KERNEL_CACHE.get(path)
    if cached is None or cached[0] != path.stat().st_mtime_ns:
        cached = _KERNEL_CACHE[path] = (path.stat().st_mtime_ns, KernelPredictor.load(path))
    return cached[1]


_KERNEL_CACHE: dict[Path, tuple[int, Any]] = {}


def predict_model(path: Path, target: TargetProfile, static: StaticProfile | None = None) -> dict[str, Any]:
    """Predicted figures for a model file: kernel-level latency where the target was calibrated in person,
    else the roofline (with host-calibrated op factors where the host is of the target's architecture)."""
    from ..targets import kernels_file

    static = static or analyse(path)
    predicted = predict(static, target, calibrated_host(target))
    kp = kernel_predictor(target)
    if kp is not None and path.suffix == ".onnx":
        latency = kp.predict_ms(path)
        predicted["roofline_latency_ms"] = predicted["latency_ms"]
        predicted["latency_ms"] = round(latency, 4)
        predicted["energy_mj"] = round(latency * target.power.active_w, 4)
        predicted["basis"] = (f"{kp.provenance()}: {target.name}'s kernel-level predictor ({len(kp.samples)} "
                              f"kernels); energy at {target.power.active_w:g} W active")
        cal = kp.meta.get("calibration") if isinstance(kp.meta.get("calibration"), dict) else {}
        predicted["calibration"] = {"devices": cal.get("devices"), "date": cal.get("date") or kp.meta.get("date"),
                                    "kernels": len(kp.samples), "file": str(kernels_file(target.name))}
    return predicted


def profile_model(path: Path, target: TargetProfile, runs: int = 100, analysis: Path | None = None) -> ProfileReport:
    """``analysis``: an ONNX twin of ``path`` (same model and precision) when ``path`` is not ONNX; static
    figures and predictions come from it, measurements and the file size from ``path`` itself."""
    static = analyse(analysis or path)
    static.size_bytes = path.stat().st_size
    predicted = predict_model(analysis or path, target, static)
    measured = measure_on_host(path, threads=host_threads(target), runs=runs)
    measured["emulated"] = True
    measured["note"] = f"measured on this host with {host_threads(target)} thread(s), not on a {target.name}"
    figures = {
        "latency_ms": (predicted["latency_ms"], "predicted"),
        "peak_memory_mb": (predicted["peak_memory_mb"], "predicted"),
        "model_size_mb": (static.size_bytes / 2**20, "file"),
        "energy_mj": (predicted["energy_mj"], "predicted"),
    }
    if target.name == HOST:  # the host is the device: what was measured answers the budget
        figures["latency_ms"] = (measured["latency_ms_p50"], "measured")
        figures["peak_memory_mb"] = (measured["rss_mb"], "measured")
        if measured.get("energy"):
            figures["energy_mj"] = (measured["energy"]["mj_per_inference"], "measured")
    return ProfileReport(target.name, static, predicted, measured, evaluate(target.budgets, figures))


__all__ = ["ProfileReport", "analyse", "measure_on_host", "predict", "predict_model", "profile_model"]
