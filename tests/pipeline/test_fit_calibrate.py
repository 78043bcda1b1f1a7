"""Fit search on tiny budgets, and the op-factor fit calibration uses; the numbers they promise, not their speed.
Calibrating a class end to end (through an agent) is tests/test_calibrate_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import REPO
from pipeline.config import load_deploy
from pipeline.errors import BudgetError
from pipeline.fit import require_best, run_fit
from pipeline.profile.calibrate import calibration_models, fit_factors
from pipeline.profile.static import CATEGORIES
from pipeline.targets import target_for_deploy
from pipeline.ui import UI


@pytest.fixture
def cfg(tmp_path):
    d = yaml.safe_load((REPO / "deploy.yaml").read_text())
    d["model"]["train"]["epochs"] = 2
    d["data"] = {"name": "digits"}
    d["fit"] = {"sparsities": [0.6], "macs_reductions": [2.0], "quantizations": ["none", "int8-static"],
                "finetune_epochs": 1, "steps": 1}
    d["workdir"] = str(tmp_path / "work")
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_deploy(path)


@pytest.mark.slow
def test_fit_picks_the_most_accurate_candidate_within_budgets(cfg, tmp_path):
    target = target_for_deploy(cfg, "rpi4")
    fit = run_fit(cfg, target, UI(quiet=True), tmp_path / "fit")
    assert len(fit.candidates) == 3 * 2  # dense, magnitude 60%, structured 2x, each fp32 and int8
    assert fit.best is not None and fit.best.passed
    assert fit.best.accuracy == max(c.accuracy for c in fit.candidates if c.passed)
    int8 = [c for c in fit.candidates if c.quantize == "int8-static"]
    assert all(c.figures["model_size_mb"] < 0.5 * next(o for o in fit.candidates if o.label == c.label and
                                                       o.quantize == "none").figures["model_size_mb"] for c in int8)
    front = [c for c in fit.candidates if c.pareto]
    assert front and all(not any(o.accuracy > c.accuracy and o.figures["latency_ms"] < c.figures["latency_ms"]
                                 for o in fit.candidates) for c in front)
    assert fit.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # budgets nothing can meet: refused, unless forced (then the fewest failures)
    tight = target.with_budgets(type(target.budgets)(latency_ms=1e-6, model_size_mb=1e-6))
    impossible = run_fit(cfg, tight, UI(quiet=True), tmp_path / "fit2")
    assert impossible.best is None
    with pytest.raises(BudgetError, match="no candidate of the fit search meets every budget of rpi4"):
        require_best(impossible, force=False)
    assert require_best(impossible, force=True).failures


def test_calibration_fit_recovers_known_costs():
    rng = np.random.default_rng(0)
    n = 40
    true_session, true = 4e-6, {"conv": (2e-6, 3.0), "gemm": (1e-6, 1.5), "elementwise": (0.5e-6, 0.0)}
    rows, times = [], []
    for _ in range(n):
        row, t = [1.0], true_session
        for cat in CATEGORIES:
            count, roof = (int(rng.integers(1, 8)), float(rng.uniform(1e-6, 5e-5))) if cat in true else (0, 0.0)
            row += [count, roof]
            if cat in true:
                t += count * true[cat][0] + roof * true[cat][1]
        rows.append(np.array(row))
        times.append(t)
    session, factors, fitted = fit_factors(rows, times)
    assert session == pytest.approx(true_session, rel=1e-3)
    assert factors["conv"].roofline_factor == pytest.approx(3.0, rel=1e-3)
    assert factors["gemm"].overhead_us == pytest.approx(1.0, rel=1e-2)
    assert set(factors) == set(true)  # categories never seen get no invented factor
    assert np.allclose(fitted, times, rtol=1e-6)


def test_calibration_models_are_reproducible_and_varied():
    import torch

    a, b = calibration_models(10, seed=3), calibration_models(10, seed=3)
    assert [n for n, _, _ in a] == [n for n, _, _ in b]
    assert {n.rstrip("0123456789") for n, _, _ in a} == {"cnn", "rescnn", "dwcnn", "invres", "mlp", "mbse"}
    for name, model, shape in a:  # every one runs
        assert model(torch.zeros(1, *shape)).shape == (1, 10), name


def test_a_correction_keeps_kinds_the_models_hardly_hold_at_their_kernels_figures():
    """Conv makes most of every model and is 1.2x slower in context than as a kernel: the fit finds it. The global
    pool is a sliver of every model (even 8x on it moves them by about 1%, less than a measurement's noise), so
    the fit holds it near 1 rather than carry such a factor to networks with many pools. A kind no model holds
    keeps its kernels' figures (1), where it used to get 0 and be priced free."""
    from pipeline.profile.calibrate.fit import fit_correction

    rng = np.random.default_rng(0)
    n = 30
    conv, dw, gpool = rng.uniform(500, 1000, n), rng.uniform(50, 150, n), rng.uniform(0.5, 2, n)
    rows = np.c_[np.ones(n), conv, dw, np.zeros(n), np.zeros(n), gpool, np.zeros((n, 2)), np.zeros(n)]
    times = (20 + 1.2 * conv + 0.9 * dw + 8.0 * gpool) * np.exp(rng.normal(0, 0.01, n))
    coef = fit_correction(rows, times)
    assert coef[1] == pytest.approx(1.2, abs=0.03) and coef[2] == pytest.approx(0.9, abs=0.15)
    assert abs(coef[5] - 1) < 1 and coef[3] == coef[4] == coef[6] == coef[7] == 1.0
    unheld = fit_correction(rows, times, prior=0)
    assert unheld[3] == 1.0 and abs(unheld[5] - 1) > abs(coef[5] - 1)


def test_whole_models_are_timed_among_the_kernels_not_after_them():
    """The models the kernels' correction is fitted against see, on average, the machine the kernels saw."""
    from pipeline.profile.calibrate.build import _spread

    kernels, models = [[f"k{i}p", f"k{i}"] for i in range(20)], [[f"m{j}", f"m{j}q"] for j in range(4)]
    order = [u[0] for u in _spread(kernels, models)]
    assert sorted(order) == sorted(u[0] for u in kernels + models)
    at = [order.index(f"m{j}") for j in range(4)]
    assert at == sorted(at) and at[0] > 2 and at[-1] < len(order) - 3  # in order, none at either end
    assert max(b - a for a, b in zip(at, at[1:])) - min(b - a for a, b in zip(at, at[1:])) <= 1  # evenly
    assert [u[0] for u in _spread([], models)] == ["m0", "m1", "m2", "m3"]
