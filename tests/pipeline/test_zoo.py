"""The zoo's real-scale architectures: torchvision's parameter counts, and each one exports to ONNX, matches
onnxruntime and goes through the static profiler (at a small input, so the test stays fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import ZOO_NAMES
from pipeline.export import export_model
from pipeline.models import MODELS
from pipeline.models.zoo import DEFAULT_INPUT_SHAPES
from pipeline.profile import analyse


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, classes, expected", [
    ("mobilenetv2", 1000, 3_504_872), ("mobilenetv3-small", 1000, 2_542_856), ("resnet18", 1000, 11_689_512)])
def test_parameter_counts_are_torchvisions(name, classes, expected):
    assert params(MODELS.get(name)(DEFAULT_INPUT_SHAPES[name], classes)) == expected


def test_mobilenetv2_width_multiplier_scales_channels():
    half = MODELS.get("mobilenetv2")((3, 224, 224), 1000, width=0.5)
    assert params(half) == 1_968_680  # torchvision's mobilenet_v2(width_mult=0.5)
    assert half.features[0][0].out_channels == 16 and half.classifier[1].in_features == 1280


def test_ds_cnn_is_hello_edges_small_model():
    model = MODELS.get("ds-cnn")((1, 49, 10), 12)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert 23_000 <= params(model) <= 25_000
    assert convs[0].kernel_size == (10, 4) and convs[0].stride == (2, 2)
    assert [c.groups for c in convs[1:]] == [64, 1] * 4 and all(c.out_channels == 64 for c in convs)
    assert model[:3](torch.zeros(1, 1, 49, 10)).shape == (1, 64, 25, 5)  # SAME padding at stride 2


def test_zoo_names_are_the_registrys():
    assert list(ZOO_NAMES) == MODELS.names()


@pytest.mark.parametrize("name, shape", [("mobilenetv2", (3, 32, 32)), ("mobilenetv3-small", (3, 32, 32)),
                                         ("resnet18", (3, 32, 32)), ("ds-cnn", (1, 49, 10))])
def test_real_architectures_export_match_onnxruntime_and_profile(name, shape, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = MODELS.get(name)(shape, 10).eval()
    path = export_model("onnx", model, shape, tmp_path / f"{name}.onnx", 17)
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    profile = analyse(path)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert profile.macs > 0 and sum(n.op == "Conv" for n in profile.nodes) == len(convs)
    assert profile.params <= params(model) and profile.peak_activation_bytes > 0
