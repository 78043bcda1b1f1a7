"""Sensitivity-guided pruning: prune each layer alone at several ratios, measure the accuracy drop on
a validation split, then choose layer-wise ratios that reach a global target with the least harm.

The allocation raises one threshold on the tolerated per-layer drop until the weighted sparsity
reaches the target (bisection), each layer taking the largest ratio whose measured drop stays
under the threshold (linear between measured ratios), as in Han et al. 2015's sensitivity scans.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.training import evaluate, split_validation
from .base import CompressContext, Method, StepReport, prunable
from .params import SensitivityParams
from .masks import check_alive, fold, install, keep_masks
from .unstructured import layer_scores, schedule


def scan(model: nn.Module, names: list[str], layers: list[nn.Module], scores: list[torch.Tensor],
         ratios: list[float], x_val: np.ndarray, y_val: np.ndarray) -> tuple[float, dict[str, list[float]]]:
    """Accuracy drop per layer per ratio, each layer pruned alone (others dense)."""
    base = evaluate(model, x_val, y_val)
    drops: dict[str, list[float]] = {}
    for name, layer, score in zip(names, layers, scores):
        original = layer.weight.detach().clone()
        row = []
        for r in ratios:
            [mask] = keep_masks([score], [original], [r], "layer")
            with torch.no_grad():
                layer.weight.mul_(mask)
            row.append(round(base - evaluate(model, x_val, y_val), 5))
            with torch.no_grad():
                layer.weight.copy_(original)
        drops[name] = row
    return base, drops


def allocate(sizes: list[int], drops: list[list[float]], ratios: list[float], target: float) -> list[float]:
    """Layer ratios reaching ``target`` (weighted by layer size) under the lowest common drop threshold."""
    grid = np.array([0.0, *ratios])
    curves = [np.maximum.accumulate(np.array([0.0, *d])) for d in drops]  # drop never falls as ratio grows
    total = float(sum(sizes))

    def ratios_at(threshold: float) -> list[float]:
        out = []
        for c in curves:
            ok = np.nonzero(c <= threshold)[0]
            i = int(ok[-1])
            if i + 1 < len(grid) and c[i + 1] > c[i]:  # interpolate into the next measured point
                i_frac = (threshold - c[i]) / (c[i + 1] - c[i])
                out.append(float(grid[i] + i_frac * (grid[i + 1] - grid[i])))
            else:
                out.append(float(grid[i]))
        return out

    def sparsity(rs: list[float]) -> float:
        return sum(r * n for r, n in zip(rs, sizes)) / total

    lo, hi = 0.0, max(float(c[-1]) for c in curves) + 1e-9
    if sparsity(ratios_at(hi)) < target:  # even the most tolerant threshold falls short: scale up evenly
        rs = ratios_at(hi)
        scale = target / max(sparsity(rs), 1e-9)
        return [min(r * scale, max(ratios)) for r in rs]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparsity(ratios_at(mid)) < target else (lo, mid)
    rs = ratios_at(hi)
    scale = target / max(sparsity(rs), 1e-9)  # land exactly on the target
    return [min(r * scale, max(ratios)) for r in rs]


class Sensitivity(Method):
    name = "sensitivity"
    Params = SensitivityParams
    params: SensitivityParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        named = prunable(model)
        names, layers = [n for n, _ in named], [m for _, m in named]
        fold(layers)
        _, x_val, y_val = split_validation(ctx.data, p.val_samples / len(ctx.data.x_train), ctx.train.seed)
        scores = layer_scores(model, layers, p.criterion, ctx, p.score_samples)
        base, drops = scan(model, names, layers, scores, p.ratios, x_val, y_val)
        sizes = [m.weight.numel() for m in layers]
        final = allocate(sizes, [drops[n] for n in names], p.ratios, p.sparsity)
        ctx.progress("sensitivity: " + ", ".join(f"{n} {r:.0%}" for n, r in zip(names, final)))
        history: list[dict[str, Any]] = []
        for step, frac in enumerate(schedule(1.0, p.steps, p.schedule), start=1):
            rs = [r * frac for r in final]
            fold(layers)
            scores = layer_scores(model, layers, p.criterion, ctx, p.score_samples)
            masks = keep_masks(scores, [m.weight.detach() for m in layers], rs, "layer")
            check_alive(names, masks, "sensitivity")
            install(layers, masks)
            pruned_acc = ctx.accuracy(model)
            ctx.finetune_model(model, p.finetune_epochs, p.lr, label=f"sensitivity step {step}/{p.steps}")
            history.append({"step": step, "sparsity": round(sum(r * n for r, n in zip(rs, sizes)) / sum(sizes), 4),
                            "accuracy_pruned": pruned_acc, "accuracy_finetuned": ctx.accuracy(model)})
        fold(layers)
        table = [{"layer": n, "params": s, "drops": dict(zip(map(str, p.ratios), drops[n])), "ratio": round(r, 4)}
                 for n, s, r in zip(names, sizes, final)]
        return self.report(model, ctx, t0, history, validation_accuracy=base, sensitivity=table)
