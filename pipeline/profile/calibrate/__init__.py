"""Calibrating a device class from its own devices (``pipeline targets calibrate --target T``).

The host builds a suite (``build``: single kernels in context, whole random models, the peak cases and the speed
probe, as ONNX files), the class's devices time it through their agents (a ``calibration`` artifact over the
normal OTA path, see ``pipeline.calibration``), and from what they measured the host fits (``fit``) and writes
(``write``) the class's kernel-level predictor with its provenance into the user directory
(``pipeline.targets.user_dir()``: ``$EDGEFLEET_TARGETS_DIR``, else ``~/.config/edgefleet/targets``), never into
the installation. ``host`` is calibrated the same way, through a local agent process; for it ``host.yaml`` is
written too (its peak rates and op factors). ``suite`` holds what is timed, ``peaks`` the rates. ``refit`` fits
the predictor again from the stored suite results and the fleet's measured models (``--from-fleet``).
"""

from __future__ import annotations

from typing import Any

from ...targets import TargetProfile
from .. import HOST
from .build import SCALES, BuiltSuite, build_suite, parse_scale
from .fit import Measured, combine, features, fit_factors, fit_op_factors, fit_predictor, with_peaks
from .peaks import cpu_clock_ghz, cpu_model, rates
from .suite import calibration_models, kernel_configs, kernel_module, kernel_prefix
from .write import host_profile, kernels_path, write_host_yaml, write_kernels


def fit_calibration(built: BuiltSuite, per_device: dict[str, dict[str, dict[str, Any]]],
                    target: TargetProfile) -> dict[str, Any]:
    """Everything the devices measured of ``built``, fitted: {measured, peaks, predictor, kernel_fit, profile,
    ops}. ``per_device``: device id -> case id -> its result (``median_ms`` at least)."""
    measured = combine(built.suite, per_device)
    peaks = rates({cid: measured.p10_ms.get(cid) for cid in ("peak-fp32", "peak-int8", "bandwidth")})
    predictor, kernel_fit = fit_predictor(built, measured)
    threads = built.suite.threads or target.cpu.cores
    profile = host_profile(peaks, threads, target) if target.name == HOST else with_peaks(target, peaks)
    ops = fit_op_factors(built, measured, profile)
    return {"measured": measured, "peaks": peaks, "predictor": predictor, "kernel_fit": kernel_fit,
            "profile": profile, "ops": ops, "threads": threads}


def store_calibration(fitted: dict[str, Any], target: TargetProfile, provenance: dict[str, Any]) -> dict[str, str]:
    """``<target>.kernels.json`` (and for ``host``, ``host.yaml``) in the user directory; returns what was written.
    ``provenance``: the devices, their versions, the date... kept under the file's ``meta.calibration``."""
    written: dict[str, str] = {}
    predictor, kernel_fit = fitted["predictor"], fitted["kernel_fit"]
    if predictor is not None:
        meta = {"kernels": kernel_fit["kernels"], "reference_ms": predictor.reference_ms,
                "models": kernel_fit["models"], "median_abs_error_pct": kernel_fit["median_abs_error_pct"],
                "within_10pct": kernel_fit["within_10pct"], "threads": fitted["threads"],
                "date": provenance.get("date"), "calibration": {**provenance, "fit": kernel_fit,
                                                                "peaks": fitted["peaks"]}}
        written["kernels"] = str(write_kernels(predictor, target.name, meta))
    if target.name == HOST and fitted["ops"] is not None:
        written["target"] = str(write_host_yaml({"host": fitted["profile"], "threads": fitted["threads"],
                                                 "devices": provenance.get("devices"), **fitted["ops"]}))
    return written


__all__ = ["SCALES", "BuiltSuite", "Measured", "build_suite", "calibration_models", "combine", "cpu_clock_ghz",
           "cpu_model", "features", "fit_calibration", "fit_factors", "fit_op_factors", "fit_predictor",
           "host_profile", "kernel_configs", "kernel_module", "kernel_prefix", "kernels_path", "parse_scale", "rates",
           "store_calibration", "with_peaks", "write_host_yaml", "write_kernels"]
