"""Structured pruning keeps its promises on architectures it was not tuned on: the MAC target within 5% for
any number of steps, round_to on every group (the branches of a concatenation included), no layer cut by
more than the ratio asks, and one dependency graph for the whole search."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.compress import CompressContext, build_recipe, run_recipe
from pipeline.compress.channels import ChannelGroups
from pipeline.compress.structured import count_macs
from pipeline.config import CompressStep, TrainConfig
from pipeline.data import load_dataset


def cbr(cin, cout, k=3, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class TwoBranch(nn.Module):
    """Stem, a 1x1 and a 3x3-then-depthwise branch concatenated, an inverted residual, a classifier."""

    def __init__(self, stem=24, branch=16, classes=10):
        super().__init__()
        self.stem = cbr(1, stem)
        self.a = cbr(stem, branch, 1)
        self.b = nn.Sequential(cbr(stem, branch, 3), cbr(branch, branch, 3, groups=branch))
        c = 2 * branch
        self.expand, self.dw, self.project = cbr(c, 2 * c, 1), cbr(2 * c, 2 * c, 3, groups=2 * c), cbr(2 * c, c, 1,
                                                                                                    act=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], 1)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x)


class DenseResidual(nn.Module):
    """Dense growth by concatenation, then a residual pair of 3x3 convolutions."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = cbr(1, 16)
        self.grow1, self.grow2 = cbr(16, 12), cbr(28, 12)
        self.mix = cbr(40, 32, 1)
        self.c1, self.c2 = cbr(32, 32), cbr(32, 32, act=False)
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.grow1(x)], 1)
        x = self.mix(torch.cat([x, self.grow2(x)], 1))
        x = torch.relu(x + self.c2(self.c1(x)))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


class GroupedSE(nn.Module):
    """Grouped 1x1 convolutions (4 groups), a depthwise 3x3, squeeze-and-excitation, a residual add."""

    def __init__(self, c=48, classes=10):
        super().__init__()
        self.stem = cbr(1, c)
        self.expand = cbr(c, 2 * c, 1, groups=4)
        self.dw = cbr(2 * c, 2 * c, 3, groups=2 * c)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * c, c // 2, 1), nn.ReLU(),
                                nn.Conv2d(c // 2, 2 * c, 1), nn.Sigmoid())
        self.project = cbr(2 * c, c, 1, groups=4, act=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        return self.head(x + self.project(y * self.se(y)))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def prune(model, digits, **step):
    model = copy.deepcopy(model)
    [method] = build_recipe([CompressStep(method="structured", finetune_epochs=0, **step)])
    [report] = run_recipe(model, [method], CompressContext(digits, TrainConfig()))
    return model, report


def fresh(cls):
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("cls", [TwoBranch, DenseResidual, GroupedSE])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("target, round_to", [(2.0, None), (3.0, 4)])
def test_the_mac_target_is_met_within_5_percent_for_any_number_of_steps(digits, cls, steps, target, round_to):
    model = fresh(cls)
    dense = count_macs(model, torch.zeros(1, 1, 8, 8))[0]
    pruned, report = prune(model, digits, macs_reduction=target, steps=steps, round_to=round_to)
    achieved = dense / count_macs(pruned, torch.zeros(1, 1, 8, 8))[0]
    assert target <= achieved <= target * 1.05, (achieved, report.history)
    assert report.extra["mac_ratio"] == pytest.approx(achieved, abs=1e-3)
    assert [h["step"] for h in report.history] == list(range(1, steps + 1))
    ratios = [h["mac_ratio"] for h in report.history]
    assert ratios == sorted(ratios)  # each step cuts further; they compose to the target
    assert pruned(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_global_ranking_meets_the_mac_target_too(digits):
    model = fresh(TwoBranch)
    _, report = prune(model, digits, macs_reduction=2.0, steps=2, global_pruning=True, round_to=4)
    assert 2.0 <= report.extra["mac_ratio"] <= 2.1


@pytest.mark.parametrize("step", [{"ratio": 0.3}, {"ratio": 0.6}, {"macs_reduction": 2.0}, {"macs_reduction": 3.0}])
def test_round_to_holds_on_every_group_and_on_both_concatenated_branches(digits, step):
    pruned, _ = prune(fresh(TwoBranch), digits, round_to=8, **step)
    a, b = pruned.a[0].out_channels, pruned.b[1][0].out_channels
    assert a % 8 == 0 and b % 8 == 0 and pruned.expand[0].in_channels == a + b
    if step.get("ratio", 1) >= 0.5:
        assert a + b < 32  # the concatenated branches were cut, each to a multiple, not left alone
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(w % 8 == 0 for w in widths.values()), widths
    dense, _ = prune(fresh(DenseResidual), digits, round_to=4, **step)
    assert all(m.out_channels % 4 == 0 for m in dense.modules() if isinstance(m, nn.Conv2d)), dense


@pytest.mark.parametrize("round_to", [None, 8])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_a_ratio_never_cuts_a_layer_by_more_than_it_asks(digits, ratio, round_to):
    model = fresh(TwoBranch)
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned, report = prune(model, digits, ratio=ratio, round_to=round_to)
    after = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    for name, width in before.items():
        assert after[name] >= math.ceil(width * (1 - ratio)), (name, width, after[name])
        if round_to is None:
            assert after[name] == math.ceil(width * (1 - ratio))  # and cuts what it asks
    assert after["stem.0"] == (12 if ratio == 0.5 and round_to is None else after["stem.0"])
    assert report.extra["mac_ratio"] > 1.1


def test_one_dependency_graph_serves_every_probe_and_step(digits, monkeypatch):
    import torch_pruning as tp

    traced = []
    build = tp.DependencyGraph.build_dependency
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency",
                        lambda self, *a, **k: traced.append(1) or build(self, *a, **k))
    _, report = prune(fresh(TwoBranch), digits, macs_reduction=2.5, steps=3, round_to=4)
    assert len(traced) == 1 and report.extra["search_probes"] > 10


@pytest.mark.parametrize("cls", [TwoBranch, DenseResidual])
def test_the_mac_model_predicts_what_pruning_gives(cls):
    import torch_pruning as tp

    model = fresh(cls)
    example = torch.zeros(1, 1, 8, 8)
    groups = ChannelGroups(model, example, [model.fc if cls is DenseResidual else model.head[2]], 4, 0.9)
    scores = groups.scores(tp.importance.GroupMagnitudeImportance(p=2))
    for ratio in (0.3, 0.6):
        keeps = groups.keeps_at(ratio)
        predicted = groups.predict(keeps)
        groups.prune(keeps, scores)
        assert groups.macs == count_macs(model, example)[0]
        assert groups.macs == pytest.approx(predicted, rel=0.005)
        scores = groups.scores(tp.importance.GroupMagnitudeImportance(p=2))


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_grouped_convolutions_lose_channels_alike_from_every_group(digits, target):
    """A grouped convolution keeps its groups: every width it reads or writes stays a multiple of them, each group
    losing the same positions; the model runs and its MACs land on the target."""
    model = fresh(GroupedSE)
    pruned, _ = prune(model, digits, macs_reduction=target, round_to=4)
    x = torch.zeros(2, 1, 8, 8)
    assert target <= count_macs(model, x[:1])[0] / count_macs(pruned, x[:1])[0] <= target * 1.05
    for name in ("expand", "project"):
        conv = getattr(pruned, name)[0]
        assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0, name
    assert pruned.expand[0].out_channels < 96 and pruned(x).shape == (2, 10)


def test_cutting_dead_channels_of_a_grouped_convolution_changes_nothing(digits):
    """Channels that carry nothing (their producer's weights, BatchNorm shift and the grouped consumer's weights on
    them all zero) at the same position of each of 4 groups are the ones cut, and the outputs stay the same: the
    cut indices line up with the grouped convolution's blocks."""
    torch.manual_seed(0)
    model = GroupedSE(c=16).eval()
    dead = [1 + 4 * k for k in range(4)] + [2 + 4 * k for k in range(4)]  # positions 1 and 2 of each 4-wide block
    with torch.no_grad():
        model.stem[0].weight[dead] = 0
        model.stem[1].bias[dead] = 0
        model.project[1].bias[dead] = 0
        model.project[0].weight[dead] = 0
        expand = model.expand[0].weight  # (32, 4, 1, 1): group g reads input channels 4g..4g+3
        expand[:, [1, 2]] = 0
        model.head[2].weight[:, dead] = 0
    x = torch.from_numpy(digits.x_test[:16])
    before = model(x)
    groups = ChannelGroups(model, x[:1], [model.head[2]], round_to=None, max_layer_ratio=0.9)
    [j] = [i for i, g in enumerate(groups.groups)
           if any(d.target.module is model.stem[0] for d, _ in groups._items[g.graph_group])]
    assert groups.groups[j].blocks == 4
    keeps = groups.widths()
    keeps[j] = 8
    from pipeline.compress.importance import get_criterion

    groups.prune(keeps, groups.scores(get_criterion("l2").group_importance()))
    assert model.stem[0].out_channels == 8 and model.expand[0].in_channels == 8 and model.expand[0].groups == 4
    assert torch.allclose(model(x), before, atol=1e-5)
