"""Shared fixtures: real brokers on free loopback ports, a tiny model, signing keys, local agents.

A missing system component skips a test on a developer's machine (with the reason shown by -ra)
but fails it under CI=true: CI must never go green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent


def require(available: bool, what: str) -> None:
    if available:
        return
    if CI:
        pytest.fail(f"{what} is missing; CI needs it (the Makefile installs it)")
    pytest.skip(f"{what} is missing (make install installs it)")


@pytest.fixture
def tflite():
    """litert-torch (conversion) and a TFLite interpreter: the [tflite] extra, which `make test` installs."""
    import importlib.util

    require(importlib.util.find_spec("litert_torch") is not None
            and importlib.util.find_spec("ai_edge_litert") is not None, "the [tflite] extra (litert-torch)")


@pytest.fixture
def mosquitto(tmp_path):
    from pipeline.ota.broker import LocalBroker, mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    with LocalBroker("mosquitto", tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def amqtt_broker(tmp_path):
    from pipeline.ota.broker import LocalBroker

    with LocalBroker("amqtt", tmp_path / "amqtt") as broker:
        yield broker


@pytest.fixture(scope="session")
def tiny_model():
    """A two-layer MLP on 8x8 inputs, with fixed random weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    from pipeline.export import export_model

    return export_model("onnx", tiny_model, (1, 8, 8), tmp_path_factory.mktemp("onnx") / "model.onnx", 17)


@pytest.fixture
def key_dir(tmp_path) -> Path:
    from pipeline.bundle import load_or_create

    d = tmp_path / "keys"
    load_or_create(d)
    return d


def make_artifact(model_path: Path, out: Path, key_dir: Path, version: int, target: str = "rpi4", **kw):
    from pipeline.bundle import build_artifact

    x = np.random.default_rng(version).random((3, 1, 8, 8), dtype=np.float32)
    return build_artifact(model_path, out, name="tiny", version=version, target=target, runtime="onnxruntime",
                          golden_inputs=x, budgets={}, predicted={}, health={"runs": 5}, key_dir=key_dir, **kw)
