"""The latency comparison adapts to the models: runs per round from their latency, rounds until the speedup's
interval is tight or the budget is spent; fixed rounds and runs still mean what they say."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.export import export_model
from pipeline.profile.compare import Adaptive, compare_latency, median_ci


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    wide = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 10)).eval()
    return (export_model("onnx", tiny, (1, 8, 8), tmp / "tiny.onnx", 17),
            export_model("onnx", wide, (1, 8, 8), tmp / "wide.onnx", 17))


def test_median_interval_brackets_the_median():
    rng = np.random.default_rng(0)
    v = rng.normal(2.0, 0.1, 101)
    lo, hi = median_ci(v)
    assert lo < np.median(v) < hi and hi - lo < 0.1
    assert median_ci(np.array([1.0, 1.0, 1.0])) == (1.0, 1.0)


def test_rounds_and_runs_adapt_to_latency_and_budget(models):
    tiny, wide = models
    policy = Adaptive(round_s=0.02, min_rounds=3, max_rounds=200, budget_s=1.5, rel_ci=1e-9)  # never tight enough
    t0 = time.perf_counter()
    rows = compare_latency([wide, tiny], (1, 8, 8), adaptive=policy)
    assert time.perf_counter() - t0 < 1.5 + 1.0  # the budget ends it (plus warm-up and one round)
    assert rows[0]["runs"] < rows[1]["runs"]  # the slower model gets fewer runs per round
    assert 3 <= rows[0]["rounds"] < 200
    assert rows[1]["speedup"] > 1 and rows[1]["speedup_ci"][0] <= rows[1]["speedup"] <= rows[1]["speedup_ci"][1]
    for r in rows:  # each variant's own round medians bracket its median
        assert r["latency_spread_ms"][0] <= r["latency_ms"] <= r["latency_spread_ms"][1]
    easy = compare_latency([tiny, tiny], (1, 8, 8), adaptive=Adaptive(round_s=0.01, min_rounds=4, rel_ci=0.5))
    assert easy[0]["rounds"] == 4  # tight at once: stops at the minimum


def test_fixed_rounds_and_runs_are_honoured(models):
    tiny, _ = models
    rows = compare_latency([tiny, tiny], (1, 8, 8), rounds=3, runs=7, warmup=2)
    assert [(r["rounds"], r["runs"]) for r in rows] == [(3, 7), (3, 7)]
