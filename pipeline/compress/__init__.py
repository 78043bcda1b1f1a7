"""Compression: a recipe is a list of steps, each naming a registered method with its parameters.

Adding a method is one module that subclasses ``Method`` and registers it under the name
deploy.yaml uses (``compress: [{method: NAME, ...params}]``). Importance criteria are a registry
of their own (``pipeline.compress.importance.CRITERIA``).
"""

from __future__ import annotations

import copy

from torch import nn

from ..config import CompressStep, _format
from ..errors import ConfigError
from ..registry import UnknownNameError
from .base import METHODS, CompressContext, Method, StepReport, model_stats
from .importance import CRITERIA

from . import lottery, lowrank, sensitivity, sparse_training, structured, unstructured  # noqa: E402,F401  (register)

__all__ = ["CRITERIA", "METHODS", "CompressContext", "Method", "StepReport", "build_recipe", "model_stats",
           "run_recipe", "validate_recipe"]


def build_recipe(steps: list[CompressStep], where: str = "deploy.yaml", key: str = "compress") -> list[Method]:
    from pydantic import ValidationError

    methods = []
    for i, step in enumerate(steps):
        try:
            cls = METHODS.get(step.method)
        except UnknownNameError as exc:
            raise ConfigError(f"{where}: {key}[{i}].method: {exc}") from None
        try:
            params = cls.Params.model_validate(step.params())
        except ValidationError as exc:
            raise ConfigError(_format(exc, f"{where}: {key}[{i}] ({step.method})")) from None
        methods.append(cls(params))
    return methods


def validate_recipe(steps: list[CompressStep], where: str, key: str = "compress") -> None:
    build_recipe(steps, where, key)


def run_recipe(model: nn.Module, methods: list[Method], ctx: CompressContext) -> list[StepReport]:
    """Apply the steps in order, in place; the dense model is the distillation teacher when asked."""
    if ctx.finetune.distill and ctx.teacher is None:
        ctx.teacher = copy.deepcopy(model).eval()
        for p in ctx.teacher.parameters():
            p.requires_grad_(False)
    return [m.apply(model, ctx) for m in methods]
