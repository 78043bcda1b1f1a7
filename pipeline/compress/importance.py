"""Importance criteria: how much a weight (unstructured) or a channel group (structured) matters.

One registry, keyed by the names recipes use (``criterion: taylor``). Each criterion scores single
weights for unstructured pruning and hands Torch-Pruning a group importance for structured pruning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressionError
from ..registry import Registry
from .batchnorm import bn_scales, fold_bn
from .params import CRITERION_NAMES, CriterionName, known_criterion  # noqa: F401  (the torch-free names)


class Criterion(ABC):
    name: ClassVar[str]
    #: "grad": needs summed gradients; "grad2": needs summed squared per-sample gradients
    needs: ClassVar[str | None] = None
    #: the score grows as |w| to this power: a following BatchNorm's per-channel scale folds in at that power.
    #: None where the score already carries it (a gradient through the BatchNorm does)
    magnitude_power: ClassVar[int | None] = None

    @abstractmethod
    def weight_scores(self, layers: list[nn.Module], grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """One score per weight, same shapes as the weights; higher means keep."""

    @abstractmethod
    def group_importance(self):
        """A torch_pruning importance object for channel groups."""


CRITERIA: Registry[type[Criterion]] = Registry("importance criterion")


def get_criterion(name: str) -> Criterion:
    return CRITERIA.get(name)()


@CRITERIA.register("l1")
class L1(Criterion):
    name = "l1"
    magnitude_power = 1

    def weight_scores(self, layers, grads):
        return [m.weight.detach().abs() for m in layers]

    def group_importance(self):
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=1)


@CRITERIA.register("l2")
class L2(Criterion):
    name = "l2"
    magnitude_power = 2

    def weight_scores(self, layers, grads):
        return [m.weight.detach() ** 2 for m in layers]

    def group_importance(self):
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=2)


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """First-order Taylor expansion of the loss: sum over mini-batches of |w * dL/dw| (Molchanov et al. 2019)."""

    name = "taylor"
    needs = "grad"

    def weight_scores(self, layers, grads):
        return [(m.weight.detach() * g).abs() for m, g in zip(layers, grads)]

    def group_importance(self):
        import torch_pruning as tp

        return tp.importance.GroupTaylorImportance()


@CRITERIA.register("hessian")
class Hessian(Criterion):
    """Second order, Optimal Brain Damage with the Hessian diagonal estimated by the empirical Fisher:
    1/2 * w^2 * E[(dL/dw)^2] (LeCun et al. 1989; Theis et al. 2018)."""

    name = "hessian"
    needs = "grad2"

    def weight_scores(self, layers, grads):
        return [0.5 * m.weight.detach() ** 2 * g for m, g in zip(layers, grads)]

    def group_importance(self):
        return _FisherGroupImportance()


@CRITERIA.register("bn-scale")
class BNScale(Criterion):
    """|gamma| of the BatchNorm after a convolution (Liu et al. 2017, network slimming): channels only."""

    name = "bn-scale"

    def weight_scores(self, layers, grads):
        raise CompressionError("criterion 'bn-scale' ranks channels, not single weights: use it with "
                               "method: structured")

    def group_importance(self):
        import torch_pruning as tp

        return tp.importance.BNScaleImportance()


@CRITERIA.register("random")
class Random(Criterion):
    """The baseline any criterion must beat."""

    name = "random"

    def weight_scores(self, layers, grads):
        g = torch.Generator().manual_seed(0)
        return [torch.rand(m.weight.shape, generator=g) for m in layers]

    def group_importance(self):
        import torch_pruning as tp

        return tp.importance.RandomImportance()


def _FisherGroupImportance():
    """Torch-Pruning's GroupHessianImportance, with per-sample squared gradients summed per parameter
    (1.6's ``accumulate_grad`` keys its counters by name but stores by parameter, so it never sums)."""
    import torch_pruning as tp

    class FisherGroupImportance(tp.importance.GroupHessianImportance):
        def accumulate_grad(self, model):
            for param in model.parameters():
                if param.grad is not None:
                    g2 = param.grad.detach().pow(2)
                    self._accu_grad[param] = self._accu_grad.get(param, 0) + g2
                    self._counter[param] = self._counter.get(param, 0) + 1

    return FisherGroupImportance()


def gradients(model: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor, squared: bool,
              batch_size: int = 32) -> list[torch.Tensor]:
    """Sum over mini-batches of |dL/dw| (``squared=False``: Taylor's |w g| per batch, so batches do not cancel)
    or sum over samples of (dL/dw)^2 (``squared=True``: the empirical Fisher diagonal)."""
    model.eval()
    acc = [torch.zeros_like(m.weight) for m in layers]
    step = 1 if squared else batch_size
    for i in range(0, len(x), step):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + step]), y[i:i + step], reduction="sum").backward()
        for a, m in zip(acc, layers):
            if m.weight.grad is not None:
                a += m.weight.grad.detach() ** 2 if squared else m.weight.grad.detach().abs()
    model.zero_grad(set_to_none=True)
    return acc


def accumulate_group_signal(model: nn.Module, importance, x: torch.Tensor, y: torch.Tensor, needs: str | None) -> None:
    """Put into ``model`` (or ``importance``) what a gradient-based group importance reads."""
    if needs is None:
        return
    model.eval()
    model.zero_grad(set_to_none=True)
    if needs == "grad":
        F.cross_entropy(model(x), y).backward()
        return
    importance.zero_grad()
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        importance.accumulate_grad(model)


def lamp(score: torch.Tensor) -> torch.Tensor:
    """Layer-adaptive magnitude-based pruning (Lee et al. 2021): s_u / sum of the layer's s_v >= s_u, with s the
    squared magnitude. Scale-free within a layer (a layer's best weight scores 1), so one global ranking no
    longer empties the layers whose weights happen to be small."""
    flat = score.flatten().float()
    order = torch.argsort(flat)
    ranked = flat[order]
    tail = torch.flip(torch.cumsum(torch.flip(ranked, [0]), 0), [0])
    out = torch.empty_like(flat)
    out[order] = ranked / tail.clamp_min(torch.finfo(flat.dtype).tiny)
    return out.view_as(score)


#: how a global ranking puts layers on one scale: ``fn(scores, magnitude_power)``, keyed by ``normalise:``
NORMALISATIONS = {
    "none": lambda score, power: score,
    "lamp": lambda score, power: lamp(score ** (2 / power) if power else score),
}


def weight_scores(model: nn.Module, layers: list[nn.Module], criterion_name: str, x: torch.Tensor | None,
                  y: torch.Tensor | None, example: torch.Tensor, bn_fold: bool = True,
                  normalise: str = "none") -> list[torch.Tensor]:
    """Every weight's score by a criterion, BatchNorm-folded where the criterion reads magnitudes, then put on
    one scale across layers by ``normalise``."""
    criterion = get_criterion(criterion_name)
    grads = gradients(model, layers, x, y, squared=criterion.needs == "grad2") if criterion.needs else None
    scores = criterion.weight_scores(layers, grads)
    power = criterion.magnitude_power
    if bn_fold and power:
        scores = fold_bn(scores, bn_scales(model, layers, example), power)
    return [NORMALISATIONS[normalise](s, power) for s in scores]
