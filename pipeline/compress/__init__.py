"""Compression: a recipe is a list of steps, each naming a registered method with its parameters.

Adding a method is one module that subclasses ``Method`` and registers it under the name
deploy.yaml uses (``compress: [{method: NAME, ...params}]``).
"""

from __future__ import annotations

from ..config import CompressStep, _format
from ..errors import ConfigError
from ..registry import UnknownNameError
from .base import METHODS, CompressContext, Method, StepReport, model_stats

from . import magnitude  # noqa: E402,F401  (registers the built-in methods)

__all__ = ["METHODS", "CompressContext", "Method", "StepReport", "build_recipe", "validate_recipe", "model_stats"]


def build_recipe(steps: list[CompressStep], where: str = "deploy.yaml") -> list[Method]:
    from pydantic import ValidationError

    methods = []
    for i, step in enumerate(steps):
        try:
            cls = METHODS.get(step.method)
        except UnknownNameError as exc:
            raise ConfigError(f"{where}: compress[{i}].method: {exc}") from None
        try:
            params = cls.Params.model_validate(step.params())
        except ValidationError as exc:
            raise ConfigError(_format(exc, f"{where}: compress[{i}] ({step.method})")) from None
        methods.append(cls(params))
    return methods


def validate_recipe(steps: list[CompressStep], where: str) -> None:
    build_recipe(steps, where)
