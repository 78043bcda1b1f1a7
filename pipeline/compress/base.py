"""What every compression method's implementation shares: its context and its report (parameters: ``params``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import FinetuneConfig, TrainConfig
from ..data import Dataset
from ..models.training import FitOptions, FitResult, Progress, evaluate, fit
from .params import Params


@dataclass
class CompressContext:
    data: Dataset
    train: TrainConfig
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    teacher: nn.Module | None = None  # the dense model, when finetune.distill
    #: progress(message) for long work; the CLI renders it
    progress: Callable[[str], None] = lambda message: None
    seed_offset: int = 0

    @property
    def example_input(self) -> torch.Tensor:
        return torch.zeros((1, *self.data.input_shape))

    def fit_options(self, epochs: int, lr: float | None = None, distill: bool | None = None) -> FitOptions:
        ft = self.finetune
        self.seed_offset += 1
        use_teacher = ft.distill if distill is None else distill
        return FitOptions(
            epochs=epochs, lr=lr or ft.lr or self.train.lr / 2, batch_size=ft.batch_size or self.train.batch_size,
            seed=self.train.seed + self.seed_offset, teacher=self.teacher if use_teacher else None,
            kd_alpha=ft.kd_alpha, kd_temperature=ft.kd_temperature,
            val_fraction=ft.val_fraction if ft.patience else 0.0, patience=ft.patience, schedule=ft.schedule,
        )

    def finetune_model(self, model: nn.Module, epochs: int, lr: float | None = None, label: str = "fine-tune",
                       after_step: Callable[[int], None] | None = None) -> FitResult | None:
        if epochs <= 0:
            return None
        progress: Progress = lambda e, n, loss: self.progress(f"{label}: epoch {e}/{n}, loss {loss:.4f}")  # noqa: E731
        return fit(model, self.data, self.fit_options(epochs, lr), progress, after_step)

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.data.x_test, self.data.y_test)


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
    extra: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[Params]]

    def __init__(self, params: Params) -> None:
        self.params = params

    @abstractmethod
    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        """Compress ``model`` in place and report what it did."""

    def report(self, model: nn.Module, ctx: CompressContext, started: float, history: list[dict[str, Any]],
               **extra: Any) -> StepReport:
        stats = model_stats(model)
        return StepReport(method=self.name, params=self.params.model_dump(), accuracy=ctx.accuracy(model),
                          params_total=stats["params"], nonzero=stats["nonzero_params"],
                          wall_s=round(time.perf_counter() - started, 3), layers=stats["layers"], history=history,
                          extra=extra)


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose weights pruning acts on: convolutions and linear layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]


#: below this many weights per output channel, on average over the prunable layers, most channels compute from
#: one or two inputs: at 90% sparsity a 10.7k-weight network left 1.4 per channel (81% of its channels down to a
#: single weight) and lost 5-11 points with every family, where 2.9 cost about one (bench/pruning_generalise.py)
THIN_WEIGHTS_PER_CHANNEL = 2.0


def thinness(model: nn.Module) -> dict[str, Any]:
    """How many weights the prunable layers keep per output channel, and the share of channels down to one."""
    rows = single = kept = 0
    for _, m in prunable(model):
        per_row = (m.weight.detach().flatten(1) != 0).sum(1)
        rows += per_row.numel()
        single += int((per_row <= 1).sum())
        kept += int(per_row.sum())
    per_channel = kept / rows if rows else 0.0
    return {"weights_per_channel": round(per_channel, 2), "single_weight_channels": round(single / max(rows, 1), 3),
            "thin": rows > 0 and per_channel < THIN_WEIGHTS_PER_CHANNEL}


def model_stats(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    layers = []
    for name, m in prunable(model):
        w = m.weight
        nz = int(w.count_nonzero())
        channels = w.shape[0]
        kept = int((w.detach().flatten(1).abs().sum(1) > 0).sum()) if w.dim() > 1 else channels
        layers.append({"layer": name, "type": type(m).__name__, "shape": list(w.shape), "params": w.numel(),
                       "nonzero": nz, "sparsity": round(1 - nz / w.numel(), 4), "channels": channels,
                       "channels_nonzero": kept})
    return {"params": total, "nonzero_params": nonzero, "layers": layers}
