"""Compression: a recipe is a list of steps, each naming a registered method with its parameters.

Adding a method is its parameter model and a ``register_method`` line in ``params`` (torch-free: deploy.yaml
is validated against it) and one module with the ``Method`` subclass, imported when a recipe runs.
Importance criteria are a registry of their own (``pipeline.compress.importance.CRITERIA``).

Importing this package does not import torch: the implementations (``CompressContext``, ``Method``,
``StepReport``, ``model_stats``, ``CRITERIA``) load on first use.
"""

from __future__ import annotations

import copy
import importlib
from typing import TYPE_CHECKING, Any

from .params import METHODS, MethodSpec, Params, register_method

if TYPE_CHECKING:
    from torch import nn

    from .base import CompressContext, Method, StepReport

#: names this package offers from modules that import torch, loaded on first access
_LAZY = {"CompressContext": ".base", "Method": ".base", "StepReport": ".base", "model_stats": ".base",
         "CRITERIA": ".importance"}

__all__ = ["CRITERIA", "METHODS", "CompressContext", "Method", "MethodSpec", "Params", "StepReport", "build_recipe",
           "model_stats", "register_method", "run_recipe", "validate_recipe"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate_recipe(steps: list[Any], where: str = "deploy.yaml", key: str = "compress") -> list[Any]:
    """The steps as typed steps, or one ConfigError listing every problem (no torch)."""
    from ..config import TypedStep, parse_steps  # noqa: PLC0415 - config imports this package's params

    if all(isinstance(s, TypedStep) for s in steps):
        return list(steps)  # validated when deploy.yaml was read
    return parse_steps(steps, where, key)


def build_recipe(steps: list[Any], where: str = "deploy.yaml", key: str = "compress") -> list[Method]:
    """One ``Method`` per step; its implementation is imported here."""
    return [METHODS.get(s.method).load()(s.to_params()) for s in validate_recipe(steps, where, key)]


def run_recipe(model: nn.Module, methods: list[Method], ctx: CompressContext) -> list[StepReport]:
    """Apply the steps in order, in place; the dense model is the distillation teacher when asked."""
    if ctx.finetune.distill and ctx.teacher is None:
        ctx.teacher = copy.deepcopy(model).eval()
        for p in ctx.teacher.parameters():
            p.requires_grad_(False)
    return [m.apply(model, ctx) for m in methods]
