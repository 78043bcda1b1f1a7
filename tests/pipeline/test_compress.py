import numpy as np
import pytest
import torch
from torch import nn

from pipeline.compress import CompressContext, build_recipe, model_stats
from pipeline.compress.masks import keep_masks
from pipeline.compress.unstructured import schedule
from pipeline.config import CompressStep, TrainConfig
from pipeline.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_schedule_is_gradual_and_ends_at_target():
    s = schedule(0.9, 4, "polynomial")
    assert s[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(s, s[1:]))
    assert s[0] > 0.9 / 4  # polynomial prunes more early than linear
    assert schedule(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_global_masks_hit_the_exact_sparsity_and_keep_the_largest():
    layers = [nn.Linear(10, 10), nn.Linear(10, 30)]
    masks = keep_masks([l.weight.detach().abs() for l in layers], [l.weight.detach() for l in layers], 0.75,
                       "global")
    kept = sum(int(m.sum()) for m in masks)
    assert kept == 400 - 300
    threshold = min(float(l.weight.detach().abs()[m].min()) for l, m in zip(layers, masks))
    dropped = max(float(l.weight.detach().abs()[~m].max()) for l, m in zip(layers, masks))
    assert threshold >= dropped


def test_layerwise_masks_prune_each_layer_alike():
    layers = [nn.Linear(10, 10), nn.Linear(10, 30)]
    masks = keep_masks([l.weight.detach().abs() for l in layers], [l.weight.detach() for l in layers], 0.5, "layer")
    for layer, mask in zip(layers, masks):
        assert int(mask.sum()) == layer.weight.numel() // 2


@pytest.mark.slow
def test_iterative_pruning_reaches_target_keeps_zeros_through_finetuning_and_keeps_accuracy(digits):
    model = net()
    from pipeline.models.training import evaluate, train

    train(model, digits, epochs=5, lr=3e-3)
    dense = evaluate(model, digits.x_test, digits.y_test)
    [method] = build_recipe([CompressStep(method="magnitude", sparsity=0.8, steps=3, finetune_epochs=2)])
    report = method.apply(model, CompressContext(digits, TrainConfig(lr=3e-3)))
    stats = model_stats(model)
    weights = sum(l["params"] for l in stats["layers"])
    zero = sum(l["params"] - l["nonzero"] for l in stats["layers"])
    assert zero / weights == pytest.approx(0.8, abs=0.005)
    assert [h["sparsity"] for h in report.history] == sorted(h["sparsity"] for h in report.history)
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())  # pruning made permanent
    assert report.accuracy >= dense - 0.05, (dense, report.accuracy)
    assert report.accuracy == pytest.approx(evaluate(model, digits.x_test, digits.y_test))


def test_datasets_are_offline_and_split_as_asked():
    mnist = load_dataset("mnist-5k", 4000, 1000)
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert 0 <= mnist.x_train.min() and mnist.x_train.max() <= 1 and mnist.x_train.dtype == np.float32
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="exceed"):
        load_dataset("digits", 1700, 200)
