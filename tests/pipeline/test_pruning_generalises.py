"""Unstructured pruning on a model none of it was tuned on: BatchNorm, a concatenation, depthwise convolutions,
residual adds. Every family keeps every layer under its cap, every output channel and every classifier row
alive (each class stays predictable) and lands on the asked sparsity; the pieces behind that hold alone."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.compress import CompressContext, build_recipe, run_recipe
from pipeline.compress.base import prunable
from pipeline.compress.batchnorm import bn_scales, recalibrate
from pipeline.compress.importance import lamp
from pipeline.compress.masks import Guards, keep_masks
from pipeline.compress.sensitivity import allocate
from pipeline.compress.sparse_training import erk_densities
from pipeline.config import CompressStep, FinetuneConfig, TrainConfig
from pipeline.data import load_dataset
from pipeline.errors import CompressionError, ConfigError


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Tiny(nn.Module):
    """A stem, two concatenated branches (3x3 | 1x1 then depthwise), an inverted residual with its add."""

    def __init__(self, width: int = 8, expand: int = 2, classes: int = 10) -> None:
        super().__init__()
        half = width // 2
        self.stem = conv_bn(1, width)
        self.a = conv_bn(width, half)
        self.b = nn.Sequential(conv_bn(width, width - half, 1), conv_bn(width - half, width - half, 3, width - half))
        hidden = width * expand
        self.inv = nn.Sequential(conv_bn(width, hidden, 1), conv_bn(hidden, hidden, 3, hidden),
                                 nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc((x + self.inv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny()


def prune(model, digits, **step):
    model = copy.deepcopy(model)
    ctx = CompressContext(digits, TrainConfig(lr=3e-3), FinetuneConfig())
    [report] = run_recipe(model, build_recipe([CompressStep(**step)]), ctx)
    return model, report


def layer_sparsities(model):
    return {n: 1 - int(m.weight.count_nonzero()) / m.weight.numel() for n, m in prunable(model)}


def overall(model):
    layers = [m for _, m in prunable(model)]
    return 1 - sum(int(m.weight.count_nonzero()) for m in layers) / sum(m.weight.numel() for m in layers)


def assert_guarded(model, cap=0.98):
    for name, s in layer_sparsities(model).items():
        assert s <= cap + 1e-9, (name, s)
    for name, m in prunable(model):
        rows = m.weight.detach().flatten(1).abs().sum(1)
        assert bool((rows > 0).all()), f"{name}: {int((rows == 0).sum())} output channel(s) left without a weight"


FAMILIES = {
    "magnitude": dict(method="magnitude", sparsity=0.9, finetune_epochs=0),
    "magnitude-iterative": dict(method="magnitude", sparsity=0.9, steps=3, finetune_epochs=0),
    "unstructured-taylor": dict(method="unstructured", sparsity=0.9, criterion="taylor", finetune_epochs=0,
                                score_samples=64),
    "sensitivity-taylor": dict(method="sensitivity", sparsity=0.9, criterion="taylor", finetune_epochs=0,
                               score_samples=64, val_samples=100),
    "sensitivity-hessian": dict(method="sensitivity", sparsity=0.9, criterion="hessian", finetune_epochs=0,
                                score_samples=16, val_samples=100),
    "rigl": dict(method="sparse-training", algorithm="rigl", sparsity=0.9, epochs=1, update_interval=5),
    "set": dict(method="sparse-training", algorithm="set", sparsity=0.9, epochs=1, update_interval=5),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_at_90_percent_keeps_caps_rows_and_the_target(tiny, digits, family):
    model, report = prune(tiny, digits, **FAMILIES[family])
    assert_guarded(model)
    assert overall(model) == pytest.approx(0.9, abs=0.003)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_lottery_rounds_keep_caps_and_rows(tiny, digits):
    # two rounds of 68.4% reach 90%; the kept ticket is whichever round did best
    model, report = prune(tiny, digits, method="lottery", rounds=2, prune_per_round=0.684, epochs=1, rewind_steps=5)
    assert [h["sparsity"] for h in report.history][-1] == pytest.approx(0.9, abs=0.003)
    assert_guarded(model)
    assert overall(model) == pytest.approx(report.extra["kept"]["sparsity"], abs=0.003)


def test_asking_for_empty_rows_allows_them_and_an_impossible_target_is_refused(tiny, digits):
    model, _ = prune(tiny, digits, method="magnitude", sparsity=0.95, finetune_epochs=0, min_row_weights=0,
                     max_layer_sparsity=1.0)
    assert overall(model) == pytest.approx(0.95, abs=0.003)
    assert any(bool((m.weight.detach().flatten(1).abs().sum(1) == 0).any()) for _, m in prunable(model))
    with pytest.raises(ConfigError, match="above max_layer_sparsity 0.98"):
        build_recipe([CompressStep(method="magnitude", sparsity=0.99)])
    # the classifier's 80 weights must keep 10 (one a row), the stem's 72 keep 8: a 99% layer target cannot hold
    with pytest.raises(CompressionError, match="layer caps and row floors allow"):
        prune(tiny, digits, method="magnitude", sparsity=0.99, max_layer_sparsity=1.0, min_row_weights=3,
              finetune_epochs=0)


def test_a_weak_classifier_keeps_a_weight_per_class_by_default(digits):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        mlp[3].weight.mul_(1e-6)  # a raw global ranking takes every weight of it (and used to refuse)
    model, _ = prune(mlp, digits, method="magnitude", sparsity=0.85, finetune_epochs=0)
    assert bool((model[3].weight.abs().sum(1) > 0).all())
    assert overall(model) == pytest.approx(0.85, abs=0.002)


# --------------------------------------------------------------------------- the pieces

def test_global_masks_water_fill_past_a_capped_layer():
    small = torch.full((10, 10), 1e-3)  # ranks below everything: the raw ranking would empty it
    big = torch.rand(10, 90) + 1
    guards = Guards(max_layer_sparsity=0.9, min_row_weights=1)
    masks = keep_masks([small, big], [small, big], 0.8, "global", guards)
    kept = [int(m.sum()) for m in masks]
    assert sum(kept) == 200  # the target is still met exactly
    assert kept[0] == 10 and bool(masks[0].any(1).all())  # capped at 90%, one weight a row
    assert bool(masks[1].any(1).all())


def test_layer_masks_spread_what_a_floor_keeps_and_refuse_the_impossible():
    a, b = torch.rand(10, 4), torch.rand(10, 40)  # a: 4 per row, 2 floor each -> at most 20 of 40 go
    guards = Guards(max_layer_sparsity=1.0, min_row_weights=2)
    masks = keep_masks([a, b], [a, b], 0.75, "layer", guards)
    assert int(masks[0].sum()) == 20 and sum(int(m.sum()) for m in masks) == round(0.25 * 440)
    assert bool((masks[0].sum(1) >= 2).all())
    with pytest.raises(CompressionError, match="layer caps and row floors allow"):
        keep_masks([a, b], [a, b], 0.97, "layer", guards)


@given(st.floats(0.1, 10.0), st.integers(1, 200))
@settings(max_examples=30, deadline=None)
def test_lamp_is_scale_free_and_a_layer_keeps_its_best_weight(scale, n):
    torch.manual_seed(n)
    s = torch.rand(n) ** 2
    assert torch.allclose(lamp(s * scale), lamp(s), atol=1e-5)
    assert float(lamp(s)[torch.argmax(s)]) == pytest.approx(1.0)


def test_bn_fold_ranks_a_reparametrised_model_alike(tiny, digits):
    """w -> c w per channel, with the BatchNorm's statistics scaled to match, computes the same function:
    BatchNorm-folded magnitude must prune the same weights (raw magnitude does not)."""
    model = copy.deepcopy(tiny)
    recalibrate(model, digits.x_train[:256])
    model.stem[1].eps = 1e-12  # so that the reparametrisation is exact
    twin = copy.deepcopy(model)
    with torch.no_grad():
        c = torch.logspace(-1, 1, 8)
        twin.stem[0].weight.mul_(c.view(-1, 1, 1, 1))
        twin.stem[1].running_mean.mul_(c)
        twin.stem[1].running_var.mul_(c**2)
    x = torch.from_numpy(digits.x_test[:20])
    assert torch.allclose(model.eval()(x), twin.eval()(x), atol=1e-3)

    def stem_mask(m, **kw):
        pruned, _ = prune(m, digits, method="magnitude", sparsity=0.5, finetune_epochs=0, **kw)
        return pruned.stem[0].weight != 0

    assert torch.equal(stem_mask(model), stem_mask(twin))
    assert not torch.equal(stem_mask(model, bn_fold=False), stem_mask(twin, bn_fold=False))


def test_bn_scales_follow_the_wiring(tiny):
    layers = [m for _, m in prunable(tiny)]
    scales = bn_scales(tiny, layers, torch.zeros(1, 1, 8, 8))
    names = [n for n, _ in prunable(tiny)]
    assert scales[names.index("fc")] is None  # no BatchNorm after the classifier
    assert all(s is not None and s.numel() == m.weight.shape[0] for n, s, m in zip(names, scales, layers) if n != "fc")


def test_erk_densities_respect_floors_and_the_budget():
    shapes = [torch.Size([8, 1, 3, 3]), torch.Size([64, 64, 1, 1]), torch.Size([10, 64])]
    floors = Guards(0.98, 1).densities(shapes)
    d = erk_densities(shapes, 0.1, floors)
    sizes = [s.numel() for s in shapes]
    assert all(lo - 1e-9 <= x <= 1 for x, lo in zip(d, floors))
    assert sum(x * n for x, n in zip(d, sizes)) / sum(sizes) == pytest.approx(0.1)


def test_sensitivity_allocation_spends_the_cut_where_a_weight_costs_least():
    # a small layer that hurts and a big one that barely does: the big one takes the cut, within its limit
    ratios = [0.5, 0.9, 0.98]
    rs = allocate([100, 10_000], [[0.05, 0.2, 0.5], [0.0, 0.01, 0.03]], ratios, 0.9, limits=[0.98, 0.95])
    assert rs[1] <= 0.95 + 1e-9 and rs[0] < rs[1]
    assert (rs[0] * 100 + rs[1] * 10_000) / 10_100 == pytest.approx(0.9, abs=1e-6)


@given(st.lists(st.tuples(st.integers(10, 5000), st.lists(st.floats(-0.05, 0.3), min_size=3, max_size=3)),
                min_size=1, max_size=6), st.floats(0.05, 0.9))
@settings(max_examples=60, deadline=None)
def test_sensitivity_allocation_lands_on_the_target_whatever_the_drops(layers, target):
    """Drops measured as zero or negative (pruning that helps, or noise) must not carry the cut past the target."""
    sizes, drops = [n for n, _ in layers], [d for _, d in layers]
    rs = allocate(sizes, drops, [0.5, 0.9, 0.98], target)
    assert all(0 <= r <= 0.98 + 1e-9 for r in rs)
    assert sum(r * n for r, n in zip(rs, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-6)


# --------------------------------------------------------------------------- random architectures

@st.composite
def architectures(draw):
    width = draw(st.integers(2, 6)) * 2
    expand = draw(st.integers(1, 3))
    classes = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    model = Tiny(width, expand, classes)
    with torch.no_grad():  # BatchNorms with varied statistics, so folding them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 3)
                m.running_var.uniform_(0.01, 10)
    return model


@given(architectures(), st.floats(0.5, 0.97), st.sampled_from(["global", "layer"]))
# random again: two per-layer cases random runs found at sparsity 0.890625 (2 weights short of the target) went
# with the per-layer water-filling of 26311fe; 800 random cases passed after it (session 5)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_architectures_keep_every_guard(digits, model, sparsity, scope):
    classes = model.fc.out_features
    data = type(digits)("digits", digits.x_train[:64], digits.y_train[:64] % classes, digits.x_test[:8],
                        digits.y_test[:8] % classes, classes)
    guards = Guards(0.98, 1)
    weights = [m.weight.detach() for _, m in prunable(model)]
    room = sum(guards.limit(guards.protected(w.abs())) for w in weights)
    if round(sparsity * sum(w.numel() for w in weights)) > room:  # the floors leave too little: refused, by name
        with pytest.raises(CompressionError, match="layer caps and row floors allow"):
            prune(model, data, method="magnitude", sparsity=sparsity, scope=scope, finetune_epochs=0)
        return
    pruned, _ = prune(model, data, method="magnitude", sparsity=sparsity, scope=scope, finetune_epochs=0,
                      score_samples=32)
    assert_guarded(pruned)
    total = sum(w.numel() for w in weights)  # the target is a whole number of weights: round(sparsity x total)
    assert abs(overall(pruned) * total - round(sparsity * total)) <= 1, (overall(pruned), sparsity, total)
