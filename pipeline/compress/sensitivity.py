"""Sensitivity-guided pruning: prune each layer alone at several ratios, measure the accuracy drop on
a validation split, then choose layer-wise ratios that reach a global target with the least harm.

The scan (Han et al. 2015's sensitivity scans) prunes each layer as the final masks will (the guards'
layer cap and row floor included) and re-estimates the BatchNorm statistics before each measurement
(Li et al. 2020), so the drop is the pruning's and not stale statistics'. The allocation then spends the
target where a removed weight costs the least measured drop (a Lagrangian knapsack over the measured
ratios), no layer past its cap.
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
from .batchnorm import recalibrate, statistics_kept
from .masks import NO_GUARDS, Guards, check_alive, fold, install, keep_masks
from .unstructured import layer_scores, schedule


def caps(layers: list[nn.Module], scores: list[torch.Tensor], guards: Guards) -> list[float]:
    """The largest ratio each layer may reach under the guards."""
    return [guards.limit(guards.protected(s)) / m.weight.numel() for m, s in zip(layers, scores)]


def scan(model: nn.Module, names: list[str], layers: list[nn.Module], scores: list[torch.Tensor],
         ratios: list[float], x_val: np.ndarray, y_val: np.ndarray, guards: Guards = NO_GUARDS,
         x_cal: np.ndarray | None = None) -> tuple[float, dict[str, list[float]]]:
    """Accuracy drop per layer per ratio, each layer pruned alone (others dense), no further than its cap.
    With ``x_cal``, the BatchNorm statistics are re-estimated on it before each measurement (and restored)."""
    x_cal = x_val[:0] if x_cal is None else x_cal

    def judged() -> float:
        recalibrate(model, x_cal)
        return evaluate(model, x_val, y_val)

    drops: dict[str, list[float]] = {}
    with statistics_kept(model):
        base = judged()
        for name, layer, score, cap in zip(names, layers, scores, caps(layers, scores, guards)):
            original = layer.weight.detach().clone()
            row = []
            for r in ratios:
                [mask] = keep_masks([score], [original], [min(r, cap)], "layer", guards)
                with torch.no_grad():
                    layer.weight.mul_(mask)
                row.append(round(base - judged(), 5))
                with torch.no_grad():
                    layer.weight.copy_(original)
            drops[name] = row
    return base, drops


def allocate(sizes: list[int], drops: list[list[float]], ratios: list[float], target: float,
             limits: list[float] | None = None) -> list[float]:
    """Layer ratios removing the ``target`` share of all weights for the least summed drop, none past its
    ``limits`` entry: each layer takes the measured ratio that maximises ``lam * weights removed - drop``,
    ``lam`` (the drop a removed weight may cost) raised by bisection until the target is reached, then the
    two solutions around it mixed to land on it exactly. A weight in a large layer is as cheap as in a small
    one, so small sensitive layers (a classifier, a depthwise or first convolution) keep their weights."""
    limits = limits or [1.0] * len(sizes)
    total = float(sum(sizes))
    options = []  # per layer: ratios and drops it may take, the drop never falling as the ratio grows
    for d, cap in zip(drops, limits):
        top = min(max(ratios), cap)
        curve = np.maximum.accumulate(np.array([0.0, *d]))
        grid = np.array([0.0, *ratios])
        keep = grid <= top
        rs, cs = list(grid[keep]), list(curve[keep])
        if rs[-1] < top:  # the scan measured its cap for the ratios past it
            rs.append(top)
            cs.append(float(curve[int(np.argmax(grid >= top))] if (grid >= top).any() else curve[-1]))
        options.append((np.array(rs), np.array(cs)))

    def choice(lam: float) -> list[float]:
        out = []
        for (rs, cs), n in zip(options, sizes):
            value = lam * rs * n - cs
            out.append(float(rs[np.flatnonzero(value >= value.max() - 1e-12)[-1]]))  # ties: the larger ratio
        return out

    def sparsity(rs: list[float]) -> float:
        return sum(r * n for r, n in zip(rs, sizes)) / total

    tops = [float(rs[-1]) for rs, _ in options]
    if sparsity(tops) <= target:  # the measured ratios fall short: scale up, within the caps
        scale = target / max(sparsity(tops), 1e-9)
        return [min(r * scale, cap) for r, cap in zip(tops, limits)]
    lo, hi = 0.0, 1.0
    while sparsity(choice(hi)) < target:
        lo, hi = hi, hi * 4
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparsity(choice(mid)) < target else (lo, mid)
    # below the target nothing is free at lam = 0: where measured drops are zero (or negative) past the target,
    # the free ratios are scaled down alike
    below = choice(lo) if lo > 0 else [0.0] * len(sizes)
    above = choice(hi)
    s_lo, s_hi = sparsity(below), sparsity(above)
    t = 1.0 if s_hi - s_lo < 1e-12 else min(max((target - s_lo) / (s_hi - s_lo), 0.0), 1.0)
    return [a + t * (b - a) for a, b in zip(below, above)]


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
        rest, x_val, y_val = split_validation(ctx.data, p.val_samples / len(ctx.data.x_train), ctx.train.seed)
        guards = Guards.of(p)
        scores = layer_scores(model, layers, p.criterion, ctx, p.score_samples, p.bn_fold)
        base, drops = scan(model, names, layers, scores, p.ratios, x_val, y_val, guards,
                           rest.x_train[:p.score_samples])
        sizes = [m.weight.numel() for m in layers]
        final = allocate(sizes, [drops[n] for n in names], p.ratios, p.sparsity, caps(layers, scores, guards))
        ctx.progress("sensitivity: " + ", ".join(f"{n} {r:.0%}" for n, r in zip(names, final)))
        history: list[dict[str, Any]] = []
        for step, frac in enumerate(schedule(1.0, p.steps, p.schedule), start=1):
            rs = [r * frac for r in final]
            fold(layers)
            scores = layer_scores(model, layers, p.criterion, ctx, p.score_samples, p.bn_fold)
            masks = keep_masks(scores, [m.weight.detach() for m in layers], rs, "layer", guards, "sensitivity")
            check_alive(names, masks, "sensitivity")
            install(layers, masks)
            recalibrate(model, rest.x_train[:p.score_samples])
            pruned_acc = ctx.accuracy(model)
            ctx.finetune_model(model, p.finetune_epochs, p.lr, label=f"sensitivity step {step}/{p.steps}")
            history.append({"step": step, "sparsity": round(sum(r * n for r, n in zip(rs, sizes)) / sum(sizes), 4),
                            "accuracy_pruned": pruned_acc, "accuracy_finetuned": ctx.accuracy(model)})
        fold(layers)
        table = [{"layer": n, "params": s, "drops": dict(zip(map(str, p.ratios), drops[n])), "ratio": round(r, 4)}
                 for n, s, r in zip(names, sizes, final)]
        return self.report(model, ctx, t0, history, validation_accuracy=base, sensitivity=table)
