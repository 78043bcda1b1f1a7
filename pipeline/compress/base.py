"""What every compression method shares: its parameter model, its context and its report."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from ..config import TrainConfig
from ..data import Dataset
from ..registry import Registry


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class CompressContext:
    data: Dataset
    train: TrainConfig
    #: progress(message) for long work; the CLI renders it
    progress: Callable[[str], None] = lambda message: None


@dataclass
class StepReport:
    method: str
    params: dict[str, Any]
    accuracy: float
    params_total: int
    nonzero: int
    wall_s: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


class Method(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[Params]]

    def __init__(self, params: Params) -> None:
        self.params = params

    @abstractmethod
    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        """Compress ``model`` in place and report what it did."""


METHODS: Registry[type[Method]] = Registry("compression method")


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose weights pruning acts on: convolutions and linear layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]


def model_stats(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    layers = []
    for name, m in prunable(model):
        w = m.weight
        layers.append({"layer": name, "type": type(m).__name__, "params": w.numel(),
                       "nonzero": int(w.count_nonzero()), "sparsity": round(1 - int(w.count_nonzero()) / w.numel(), 4)})
    return {"params": total, "nonzero_params": nonzero, "layers": layers}
