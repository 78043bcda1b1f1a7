"""What one stage reads of a deployment: its own sections, with the deployment's paths already resolved.

A stage takes its view, not the whole ``DeployConfig``, so it can be run and tested on its own and cannot reach
into another stage's settings. ``DeployConfig.view_compress()`` builds the compress stage's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .sections import DataConfig, FinetuneConfig, ModelConfig
from .steps import TypedStep


@dataclass(frozen=True)
class CompressView:
    """The compress stage's inputs: where the dense model and its data come from, the recipes, how each step
    fine-tunes, and the work directory its caches live in (absolute)."""

    model: ModelConfig
    data: DataConfig
    finetune: FinetuneConfig
    steps: tuple[TypedStep, ...]
    recipes: dict[str, list[TypedStep]]
    workdir: Path
    #: the directory deploy.yaml lives in (its relative paths resolve against it) and the file, for errors
    base_dir: Path
    source: str

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def recipe(self, name: str | None) -> list[TypedStep]:
        if name is None or name == "default":
            return list(self.steps)
        if name not in self.recipes:
            raise ConfigError(f"unknown recipe {name!r}; deploy.yaml defines: "
                              f"{', '.join(['default', *sorted(self.recipes)])}")
        return list(self.recipes[name])


__all__ = ["CompressView"]
