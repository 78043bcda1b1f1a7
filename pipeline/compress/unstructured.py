"""Unstructured pruning: one-shot or iterative, global or per layer, by any importance criterion.

``magnitude`` is Han et al. 2015 (|w|); with ``steps > 1`` it follows Zhu & Gupta's gradual
polynomial schedule (or a linear one) with fine-tuning between steps. ``criterion: taylor`` or
``hessian`` rank weights by their estimated effect on the loss instead.

A global ranking puts the layers on one scale first (``normalise: lamp``, Lee et al. 2021), magnitudes
are those the following BatchNorm gives the weights (``bn_fold``), and the guards keep every layer under
``max_layer_sparsity`` and every output channel / classifier row at ``min_row_weights`` or more. After
each pruning the BatchNorm statistics are re-estimated on ``score_samples`` training samples.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..models.training import evaluate
from .base import CompressContext, Method, StepReport, prunable
from .params import UnstructuredParams
from .batchnorm import recalibrate
from .importance import weight_scores
from .masks import Guards, check_alive, fold, install, keep_masks


def schedule(final: float, steps: int, kind: str, start: float = 0.0) -> list[float]:
    """Sparsity after each step. Polynomial: s_t = s_f + (s_0 - s_f)(1 - t/n)^3, pruning fast early."""
    if kind == "linear":
        return [start + (final - start) * (t + 1) / steps for t in range(steps)]
    return [final + (start - final) * (1 - (t + 1) / steps) ** 3 for t in range(steps)]


def layer_scores(model: nn.Module, layers: list[nn.Module], criterion_name: str, ctx: CompressContext,
                 samples: int, bn_fold: bool = True, normalise: str = "none") -> list[torch.Tensor]:
    x = torch.from_numpy(ctx.data.x_train[:samples])
    y = torch.from_numpy(ctx.data.y_train[:samples])
    return weight_scores(model, layers, criterion_name, x, y, ctx.example_input, bn_fold, normalise)


class UnstructuredPruning(Method):
    Params = UnstructuredParams
    params: UnstructuredParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        named = prunable(model)
        names, layers = [n for n, _ in named], [m for _, m in named]
        history = []
        for step, target in enumerate(schedule(p.sparsity, p.steps, p.schedule), start=1):
            fold(layers)  # rank the weights as they are now
            scores = layer_scores(model, layers, p.criterion, ctx, p.score_samples, p.bn_fold,
                                  p.normalise if p.scope == "global" else "none")
            masks = keep_masks(scores, [m.weight.detach() for m in layers], target, p.scope, Guards.of(p),
                               f"{self.name} at sparsity {target:.0%}")
            check_alive(names, masks, f"{self.name} at sparsity {target:.0%}")
            install(layers, masks)
            recalibrate(model, ctx.data.x_train[:p.score_samples])
            pruned_acc = evaluate(model, ctx.data.x_test, ctx.data.y_test)
            ctx.finetune_model(model, p.finetune_epochs, p.lr, label=f"{self.name} step {step}/{p.steps}")
            acc = ctx.accuracy(model)
            history.append({"step": step, "sparsity": round(target, 4), "accuracy_pruned": pruned_acc,
                            "accuracy_finetuned": acc})
            ctx.progress(f"{self.name} ({p.criterion}) step {step}/{p.steps}: sparsity {target:.1%}, "
                         f"accuracy {pruned_acc:.2%} -> {acc:.2%} after {p.finetune_epochs} epoch(s)")
        fold(layers)
        return self.report(model, ctx, t0, history)


class Magnitude(UnstructuredPruning):
    name = "magnitude"


class Unstructured(UnstructuredPruning):
    name = "unstructured"
