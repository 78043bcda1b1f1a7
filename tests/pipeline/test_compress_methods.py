"""Each compression family on tiny models and the digits set: the numbers each one promises."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.compress import CompressContext, build_recipe, model_stats, run_recipe
from pipeline.compress.sensitivity import allocate
from pipeline.compress.sparse_training import erk_densities
from pipeline.compress.structured import count_macs
from pipeline.config import CompressStep, FinetuneConfig, TrainConfig
from pipeline.data import load_dataset
from pipeline.errors import CompressionError, ConfigError
from pipeline.export import check_parity, export_model
from pipeline.models import zoo
from pipeline.models.training import FitOptions, evaluate, fit, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def resnet(digits):
    torch.manual_seed(0)
    m = zoo.resnet_small((1, 8, 8), 10, widths=(8, 16, 32), blocks=1)
    train(m, digits, 4, 3e-3)
    return m


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train(m, digits, 6, 3e-3)
    return m


def apply(model, digits, finetune=None, **step):
    model = copy.deepcopy(model)
    [method] = build_recipe([CompressStep(**step)])
    ctx = CompressContext(digits, TrainConfig(lr=3e-3), finetune or FinetuneConfig())
    [report] = run_recipe(model, [method], ctx)
    return model, report


@pytest.mark.slow
def test_structured_meets_the_mac_target_and_exports_a_smaller_valid_model(resnet, digits, tmp_path):
    dense_macs = count_macs(resnet, torch.zeros(1, 1, 8, 8))[0]
    model, report = apply(resnet, digits, method="structured", macs_reduction=2.5, finetune_epochs=2)
    assert report.extra["mac_ratio"] >= 2.5
    assert count_macs(model, torch.zeros(1, 1, 8, 8))[0] <= dense_macs / 2.5
    assert report.accuracy > 0.8
    dense = export_model("onnx", resnet, (1, 8, 8), tmp_path / "d.onnx", 17)
    small = export_model("onnx", model, (1, 8, 8), tmp_path / "s.onnx", 17)
    assert small.stat().st_size < dense.stat().st_size / 2
    parity = check_parity(model, small, digits.x_test, digits.y_test, 1e-4)
    assert parity["accuracy_onnx"] == parity["accuracy_torch"]
    # the residual adds still line up: every block's conv2 and shortcut produce the same channel count
    for block in model.layers:
        out = block.conv2.out_channels
        assert isinstance(block.shortcut, nn.Identity) and block.conv1.in_channels == out or \
            block.shortcut[0].out_channels == out


def test_structured_keeps_depthwise_and_inverted_residuals_valid(digits):
    torch.manual_seed(0)
    model = zoo.mobilenetv2_small((1, 8, 8), 10, width=0.5)
    pruned, report = apply(model, digits, method="structured", ratio=0.5, round_to=4, finetune_epochs=0)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels  # still depthwise
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels != 10:
            assert m.out_channels % 4 == 0  # round_to kept
    assert pruned(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert report.extra["mac_ratio"] > 1.5


@pytest.mark.parametrize("criterion", ["taylor", "hessian", "l2", "bn-scale", "random"])
def test_every_criterion_drives_structured_pruning(resnet, digits, criterion):
    model, report = apply(resnet, digits, method="structured", ratio=0.3, criterion=criterion, finetune_epochs=0,
                          score_samples=16)
    assert report.extra["mac_ratio"] > 1.2 and model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_loss_aware_criteria_beat_random_one_shot(mlp, digits):
    acc = {c: apply(mlp, digits, method="unstructured", sparsity=0.9, criterion=c, finetune_epochs=0)[1].accuracy
           for c in ("taylor", "hessian", "l1", "random")}
    for c in ("taylor", "hessian", "l1"):
        assert acc[c] > acc["random"] + 0.1, acc


def test_sensitivity_allocation_spares_sensitive_layers():
    ratios = [0.5, 0.9]
    rs = allocate([1000, 1000], [[0.0, 0.01], [0.2, 0.6]], ratios, target=0.5)
    assert rs[0] > rs[1]  # the insensitive layer takes more of the cut
    assert (rs[0] * 1000 + rs[1] * 1000) / 2000 == pytest.approx(0.5, abs=1e-3)


def test_sensitivity_reaches_the_global_target(mlp, digits):
    model, report = apply(mlp, digits, method="sensitivity", sparsity=0.8, finetune_epochs=1, val_samples=200)
    stats = model_stats(model)
    weights = sum(l["params"] for l in stats["layers"])
    assert 1 - sum(l["nonzero"] for l in stats["layers"]) / weights == pytest.approx(0.8, abs=0.01)
    table = {row["layer"]: row for row in report.extra["sensitivity"]}
    assert set(table) == {"1", "3"} and all(len(r["drops"]) == 7 for r in table.values())
    assert report.accuracy > 0.9


def test_lottery_rounds_prune_geometrically_and_keep_a_ticket(mlp, digits):
    model, report = apply(mlp, digits, method="lottery", rounds=3, prune_per_round=0.5, epochs=3, rewind_steps=10,
                          tolerance=0.02)
    sparsities = [h["sparsity"] for h in report.history]
    assert sparsities == pytest.approx([0.0, 0.5, 0.75, 0.875], abs=0.01)
    kept = report.extra["kept"]
    stats = model_stats(model)
    weights = sum(l["params"] for l in stats["layers"])
    assert 1 - sum(l["nonzero"] for l in stats["layers"]) / weights == pytest.approx(kept["sparsity"], abs=0.01)
    if report.extra["winning_ticket"]:
        assert report.extra["winning_ticket"]["accuracy"] >= report.extra["dense_accuracy"] - 0.02


@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_sparse_training_holds_the_budget_while_masks_move(mlp, digits, algorithm):
    model, report = apply(mlp, digits, method="sparse-training", algorithm=algorithm, sparsity=0.8, epochs=3,
                          update_interval=10, from_scratch=True)
    h = report.history[0]
    assert h["mask_updates"] > 0
    assert h["nonzero_after"] <= h["budget"] == pytest.approx(0.2 * (64 * 64 + 64 * 10), abs=2)
    assert report.accuracy > 0.5


def test_erk_gives_small_layers_more_density():
    d = erk_densities([torch.Size([64, 64]), torch.Size([10, 64])], 0.2)
    assert d[1] > d[0]
    assert (d[0] * 4096 + d[1] * 640) / (4096 + 640) == pytest.approx(0.2)


def test_lowrank_factorises_and_approximates(mlp, digits):
    model, report = apply(mlp, digits, method="lowrank", energy=0.999, finetune_epochs=0, skip_classifier=False)
    x = torch.from_numpy(digits.x_test[:50])
    assert torch.allclose(model(x), mlp(x), atol=0.5)
    model, report = apply(mlp, digits, method="lowrank", rank_ratio=0.25, finetune_epochs=1)
    assert isinstance(model[1], nn.Sequential) and model[1][0].out_features == 16
    assert report.history[0]["params_after"] < report.history[0]["params_before"]
    assert report.accuracy > 0.85


def test_distillation_and_early_stopping(mlp, digits):
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    r = fit(student, digits, FitOptions(epochs=3, lr=1e-2, teacher=mlp, kd_alpha=0.7))
    assert evaluate(student, digits.x_test, digits.y_test) > 0.8 and r.epochs_run == 3
    frozen = copy.deepcopy(mlp)
    r = fit(frozen, digits, FitOptions(epochs=10, lr=1e-12, val_fraction=0.2, patience=1))
    assert r.epochs_run == 2 and r.best_val_accuracy is not None  # no gain after epoch 1: stop at 2


def test_a_cosine_schedule_ends_its_run_with_steps_near_zero(digits):
    """schedule: cosine takes the rate from lr to zero over the run's steps; constant keeps every step's size."""
    def step_sizes(schedule):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        last, sizes = [model[1].weight.detach().clone()], []

        def after(step):
            w = model[1].weight.detach()
            sizes.append(float((w - last[0]).abs().max()))
            last[0] = w.clone()
        fit(model, digits, FitOptions(epochs=2, lr=1e-2, schedule=schedule), after_step=after)
        return sizes

    cosine, constant = step_sizes("cosine"), step_sizes("constant")
    assert len(cosine) == len(constant) == 2 * -(-len(digits.x_train) // 64)
    assert cosine[-1] < 0.01 * cosine[0] and constant[-1] > 0.2 * constant[0]


# --------------------------------------------------------------------------- bad input

def test_unknown_criterion_and_bad_ratios_name_the_field():
    with pytest.raises(ConfigError, match="unknown importance criterion 'fisherman'; known: bn-scale, hessian"):
        build_recipe([CompressStep(method="structured", ratio=0.5, criterion="fisherman")])
    with pytest.raises(ConfigError, match="ratio: Input should be less than 1"):
        build_recipe([CompressStep(method="structured", ratio=1.5)])
    with pytest.raises(ConfigError, match="exactly one of 'ratio'"):
        build_recipe([CompressStep(method="structured")])
    with pytest.raises(ConfigError, match="sparsity: Input should be greater than 0"):
        build_recipe([CompressStep(method="magnitude", sparsity=0)])


def test_a_recipe_that_would_remove_a_whole_layer_is_refused(mlp, digits):
    weak = copy.deepcopy(mlp)
    with torch.no_grad():
        weak[3].weight.mul_(1e-6)  # a raw global ranking would take every weight of the classifier
    with pytest.raises(CompressionError, match=r"every weight of layer\(s\) \['3'\]"):  # guards and LAMP off
        apply(weak, digits, method="magnitude", sparsity=0.85, finetune_epochs=0, normalise="none",
              max_layer_sparsity=1, min_row_weights=0)
    with pytest.raises(CompressionError, match="ranks channels"):
        apply(mlp, digits, method="unstructured", sparsity=0.5, criterion="bn-scale")


class Opaque(nn.Module):
    def forward(self, x):  # leaves autograd: no dependency graph can follow it
        return x.new_tensor(x.detach().numpy()) * 2


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("custom kernel missing")


def test_untraceable_or_failing_models_name_the_layer(digits, tmp_path):
    from pipeline.errors import ExportError

    opaque = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), Opaque(), nn.Linear(32, 10))
    with pytest.raises(CompressionError, match=r"removed no channels.*layer\(s\) \['1'\]"):
        apply(opaque, digits, method="structured", ratio=0.5, finetune_epochs=0)
    broken = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Broken(), nn.Linear(32, 10))
    with pytest.raises(CompressionError, match="in layer '2': RuntimeError: custom kernel missing"):
        apply(broken, digits, method="structured", ratio=0.5, finetune_epochs=0)
    with pytest.raises(ExportError, match="at layer '2': custom kernel missing"):
        export_model("onnx", broken, (1, 8, 8), tmp_path / "b.onnx", 17)


def test_npz_datasets(tmp_path):
    from pipeline.errors import DataError

    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((20, 6, 6)), y_train=rng.integers(0, 3, 20), x_test=rng.random((5, 6, 6)),
             y_test=rng.integers(0, 3, 5))
    d = load_dataset("npz", path=path)
    assert d.input_shape == (1, 6, 6) and d.num_classes == 3 and d.x_train.dtype == np.float32
    np.savez(path, x_train=rng.random((20, 6, 6)))
    with pytest.raises(DataError, match=r"missing an array \(y_train"):
        load_dataset("npz", path=path)
