"""Where models come from: a built-in zoo (``model.zoo``) or a user factory (``model.factory``)."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelError
from ..registry import UnknownNameError
from . import zoo  # noqa: F401  (registers the built-ins)
from .registry import MODELS, ModelFactory  # noqa: F401  (the names callers import from here)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.zoo is not None:
        try:
            factory = MODELS.get(cfg.zoo)
        except UnknownNameError as exc:
            raise ModelError(f"model.zoo: {exc}") from None
        try:
            return factory(input_shape, num_classes, **cfg.options)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model.zoo {cfg.zoo!r} with options {cfg.options}: {exc}") from None
    module_name, _, attr = cfg.factory.partition(":")  # type: ignore[union-attr]
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"model.factory {cfg.factory!r}: cannot import ({exc})") from None
    try:
        model = fn(input_shape, num_classes, **cfg.options)
    except TypeError:
        model = fn(**cfg.options)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory {cfg.factory!r} returned {type(model).__name__}, expected torch.nn.Module")
    return model


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"model.checkpoint {path}: cannot load ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelError(f"model.checkpoint {path} does not fit the model: {' '.join(first)}") from None
    return model
