"""Where models come from: a built-in zoo (``model.zoo``) or a user factory (``model.factory``)."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelError
from ..registry import UnknownNameError
from . import zoo  # noqa: F401  (registers the built-ins)
from .registry import MODELS, ModelFactory  # noqa: F401  (the names callers import from here)


def _shape_args(fn, input_shape: tuple[int, ...], num_classes: int) -> tuple:
    """``(input_shape, num_classes)`` when the factory's signature takes two positional parameters, else ``()``: a
    factory that fixes its own class count is then checked against the data's (``inputs.check_model``), and a
    TypeError raised inside the factory surfaces instead of silently selecting the other call."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: the documented convention
        return (input_shape, num_classes)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) >= 2:
        return (input_shape, num_classes)
    return ()


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
    model = fn(*_shape_args(fn, input_shape, num_classes), **cfg.options)
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
