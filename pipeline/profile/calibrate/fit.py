"""The fits, from what the devices measured (nothing is timed here).

1. Per device, each case's median is set on one speed scale: the cases of a group were timed next to that
   group's probe, and are scaled by (the device's median probe) / (the group's probe), so a device that drifted
   between speed levels while it ran the suite does not bend the fit.
2. A kernel's time in context is T(prefix + kernel) - T(prefix), per device (the two were timed interleaved),
   then the median over devices; whole models take the per-case median over devices, the peak cases their 10th
   percentile's (a peak is what the device reaches, not its typical figure).
3. The kernel-level predictor (random forests per kind and precision, :class:`..kernels.KernelPredictor`) is
   fitted on the kernels, then its per-precision correction (feeds, fetches and boundary quantization are in no
   single kernel) by non-negative least squares on the whole models; the op factors (latency = session overhead +
   per category nodes x overhead + factor x roofline time) by the same on the same models. Each fit's own error
   on those models is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.calibration import Suite

from ...targets import OpFactor, TargetProfile
from ..predict import roofline_terms
from ..static import CATEGORIES
from .build import BuiltSuite

#: a kernel whose two files time alike (noise) costs this much at least, microseconds
MIN_KERNEL_US = 0.05


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


def normalise(suite: Suite, results: dict[str, dict[str, Any]], key: str = "median_ms"
              ) -> tuple[dict[str, float], float | None]:
    """One device's case figures (``key``: the medians, or the 10th percentiles) on the scale of its median probe,
    and that probe (None: no probe came back; the figures are then taken as they are)."""
    roles = suite.extra["cases"]
    probes = {c.group: results[c.id]["median_ms"] for c in suite.cases
              if roles[c.id]["role"] == "probe" and c.id in results and results[c.id]["median_ms"] > 0}
    reference = float(np.median(list(probes.values()))) if probes else None
    out = {}
    for c in suite.cases:
        r = results.get(c.id)
        if r is None:
            continue
        factor = reference / probes[c.group] if reference and c.group in probes else 1.0
        out[c.id] = float(r.get(key, r["median_ms"])) * factor
    return out, reference


@dataclass
class Measured:
    """The suite's figures combined over devices."""

    #: case id -> ms, the median over devices of each device's normalised figure
    ms: dict[str, float]
    #: kernel case id -> microseconds in context, the median over devices of (kernel - prefix)
    kernel_us: dict[str, float]
    #: the probe's latency, the median over devices of each device's median probe (None: none came back)
    reference_ms: float | None
    #: device id -> cases it measured
    counts: dict[str, int] = field(default_factory=dict)
    #: case id -> ms, the same for each case's 10th percentile: what a device reaches (the peak rates)
    p10_ms: dict[str, float] = field(default_factory=dict)


def combine(suite: Suite, per_device: dict[str, dict[str, dict[str, Any]]]) -> Measured:
    """``per_device``: device id -> case id -> the device's result for it (``median_ms`` at least)."""
    roles = suite.extra["cases"]
    ms: dict[str, list[float]] = {}
    p10: dict[str, list[float]] = {}
    kernel: dict[str, list[float]] = {}
    references = []
    for results in per_device.values():
        scaled, reference = normalise(suite, results)
        if reference:
            references.append(reference)
        for case_id, value in normalise(suite, results, "p10_ms")[0].items():
            p10.setdefault(case_id, []).append(value)
        for case_id, value in scaled.items():
            ms.setdefault(case_id, []).append(value)
            meta = roles[case_id]
            if meta["role"] == "kernel" and meta["pair"] in scaled:
                kernel.setdefault(case_id, []).append(max((value - scaled[meta["pair"]]) * 1e3, MIN_KERNEL_US))
    return Measured(ms={k: float(np.median(v)) for k, v in ms.items()},
                    kernel_us={k: float(np.median(v)) for k, v in kernel.items()},
                    reference_ms=float(np.median(references)) if references else None,
                    counts={d: len(r) for d, r in per_device.items()},
                    p10_ms={k: float(np.median(v)) for k, v in p10.items()})


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
    err = np.abs(predicted - measured) / measured
    if not len(err):
        return {"models": 0, "median_abs_error_pct": None, "within_10pct": None, "max_abs_error_pct": None}
    return {"models": int(len(err)), "median_abs_error_pct": round(float(np.median(err) * 100), 2),
            "within_10pct": round(float((err <= 0.1).mean()), 3),
            "max_abs_error_pct": round(float(err.max() * 100), 2)}


def whole_models(built: BuiltSuite, measured: Measured) -> list[tuple[str, str, float]]:
    """(case id, precision, measured ms) of every whole model that came back."""
    return [(cid, m["precision"], measured.ms[cid]) for cid, m in built.suite.extra["cases"].items()
            if m["role"] == "model" and measured.ms.get(cid, 0) > 0]


def kernel_samples(suite: Suite, measured: Measured) -> list[dict[str, Any]]:
    """The kernels' times in context as the predictor's forests take them: {kernel, us}."""
    cases = suite.extra["cases"]
    return [{"kernel": cases[cid]["kernel"], "us": round(us, 3)} for cid, us in sorted(measured.kernel_us.items())]


#: how strongly each kind's factor in a correction is held at 1 (the kernels as measured): a factor off by x costs
#: as much as PRIOR x x relative error on one model. Without it a kind that is a small share of every whole model
#: (a global pool, an add) takes whatever factor absorbs what no kernel explains (the fp32 global pool's came out
#: at 8.9 on this host), and carries it to networks where that kind is more of the time
PRIOR = 0.15


def fit_correction(rows: np.ndarray, times_us: np.ndarray, weights: np.ndarray | None = None,
                   prior: float = PRIOR) -> np.ndarray:
    """A precision's correction (see ``KernelPredictor.correction``) by non-negative least squares on whole models
    (``rows``: their kind sums): each model's relative error counts, squared, ``weights`` times (1 each by default),
    and each kind's factor is held towards 1 with ``prior`` (:data:`PRIOR`), so kinds the models hardly contain keep
    their kernels' own figures; the session term and the Q/DQ term are free."""
    from scipy.optimize import nnls

    a, t = np.asarray(rows, dtype=float), np.asarray(times_us, dtype=float)
    w = (np.sqrt(weights) if weights is not None else 1.0) / t
    scale = np.maximum(a.max(0), 1e-9)
    lhs, rhs = a / scale * w[:, None], t * w
    kinds = range(1, a.shape[1] - 1)  # [session, kinds..., Q/DQ]
    if prior > 0:
        held = [k for k in kinds if a[:, k].any()]
        p = np.zeros((len(held), a.shape[1]))
        for r, k in enumerate(held):
            p[r, k] = prior / scale[k]  # prior x (b_k - 1), b_k being the scaled unknown over scale[k]
        lhs, rhs = np.vstack([lhs, p]), np.concatenate([rhs, [prior] * len(held)])
    coef, _ = nnls(lhs, rhs)
    coef = coef / scale
    for k in kinds:  # a kind no model contains keeps its kernels' figures
        if not a[:, k].any():
            coef[k] = 1.0
    return coef


def fit_predictor(built: BuiltSuite, measured: Measured):
    """The kernel-level predictor and its correction, and its error on the whole models (overall and per
    precision)."""
    from ..kernels import KernelPredictor

    from .block import choose_block

    samples = kernel_samples(built.suite, measured)
    if not samples:
        return None, {"kernels": 0, **_errors(np.array([]), np.array([]))}
    block, evidence = choose_block(samples)
    predictor = KernelPredictor(samples, block=block)
    rows: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for cid, precision, ms in whole_models(built, measured):
        rows[precision].append(predictor.kind_sums_us(built.file(cid))[0])
        times[precision].append(ms * 1e3)
    predicted, actual, per = [], [], {}
    for key in rows:
        if not rows[key]:
            continue
        a, t = np.array(rows[key]), np.array(times[key])
        coef = fit_correction(a, t)
        predictor.correction[key] = [round(float(c), 5) for c in coef]
        predicted += list(a @ coef)
        actual += list(t)
        per[key] = _errors(a @ coef, t)
    predictor.reference_ms = round(measured.reference_ms, 5) if measured.reference_ms else None
    return predictor, {"kernels": len(samples), **_errors(np.array(predicted), np.array(actual)), "by_precision": per,
                       "block": evidence}


def fit_op_factors(built: BuiltSuite, measured: Measured, profile: TargetProfile) -> dict[str, Any] | None:
    """Op factors on the whole models against ``profile``'s roofline (its peaks as measured), or None when no
    whole model came back."""
    from ..static import analyse

    models = whole_models(built, measured)
    if not models:
        return None
    rows = [features(analyse(built.file(cid)), profile) for cid, _, _ in models]
    times = [ms / 1e3 for _, _, ms in models]
    session, factors, fitted = fit_factors(rows, times)
    return {"session_overhead_us": round(session * 1e6, 3), "ops": {k: v.model_dump() for k, v in factors.items()},
            "fit": _errors(fitted, np.array(times))}


def with_peaks(target: TargetProfile, peaks: dict[str, float]) -> TargetProfile:
    """``target`` with the peak rates its devices measured (those that came back)."""
    cpu = {k: v for k, v in (("peak_gflops_fp32", peaks.get("gflops_fp32")),
                             ("peak_gops_int8", peaks.get("gops_int8"))) if v}
    memory = {"bandwidth_gbs": peaks["bandwidth_gbs"]} if peaks.get("bandwidth_gbs") else {}
    return target.model_copy(update={"cpu": target.cpu.model_copy(update=cpu),
                                     "memory": target.memory.model_copy(update=memory)})
