"""Dynamic sparse training at a fixed parameter budget: RigL (Evci et al. 2020) or SET (Mocanu et al. 2018).

Only weights inside the mask are live; every ``update_interval`` optimizer steps each layer drops a
share of its smallest live weights and regrows as many elsewhere: by largest gradient (RigL) or at
random (SET). The drop share decays on a cosine to zero at ``end_fraction`` of training. Layer
densities follow Erdős–Rényi-Kernel (ERK) or are uniform, never under the guards' layer cap and row
floor; a drop never takes a row (output channel, class) below its floor.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from .base import CompressContext, Method, StepReport, prunable
from .params import SparseTrainingParams
from .importance import weight_scores
from .lottery import reinitialise
from .masks import NO_GUARDS, Guards, check_alive, keep_masks


def erk_densities(shapes: list[torch.Size], density: float, floors: list[float] | None = None) -> list[float]:
    """Erdős–Rényi-Kernel: density_l ∝ sum(shape)/prod(shape), scaled to the global density, within
    [floors_l, 1] (a layer pinned at a bound leaves the scaling and the others share the rest)."""
    sizes = np.array([float(np.prod(s)) for s in shapes])
    raw = np.array([sum(s) / np.prod(s) for s in shapes], dtype=float)
    low = np.array(floors if floors is not None else [0.0] * len(shapes), dtype=float)
    pinned = np.full(len(shapes), np.nan)  # the bound a layer is held at
    while True:
        free = np.isnan(pinned)
        budget = density * sizes.sum() - (pinned[~free] * sizes[~free]).sum()
        eps = budget / max((raw[free] * sizes[free]).sum(), 1e-12)
        d = np.where(free, eps * raw, pinned)
        over, under = free & (d > 1), free & (d < low)
        if not over.any() and not under.any():
            return d.tolist()
        pinned[over] = 1.0
        if not over.any():
            pinned[under] = low[under]


class MaskedTraining:
    """Keeps masks applied after every step and updates them on schedule."""

    def __init__(self, layers: list[nn.Module], masks: list[torch.Tensor], p: SparseTrainingParams, total_steps: int,
                 guards: Guards = NO_GUARDS):
        self.layers, self.masks, self.p, self.guards = layers, masks, p, guards
        self.end = int(total_steps * p.end_fraction)
        self.updates = 0
        self.rng = torch.Generator().manual_seed(0)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for m, mask in zip(self.layers, self.masks):
            m.weight.mul_(mask)

    def drop_fraction(self, step: int) -> float:
        return self.p.drop_fraction / 2 * (1 + math.cos(math.pi * step / max(self.end, 1)))

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if step % self.p.update_interval == 0 and step < self.end:
            frac = self.drop_fraction(step)
            for i, (m, mask) in enumerate(zip(self.layers, self.masks)):
                active = int(mask.sum())
                k = int(frac * active)
                if k == 0 or active == mask.numel():
                    continue
                w = m.weight.detach().flatten()
                live = mask.flatten().clone()
                floor = self.guards.protected(torch.where(mask, m.weight.detach().abs(), -1.0)).flatten()
                drop_scores = torch.where(live & ~floor, w.abs(), torch.full_like(w, float("inf")))
                k = min(k, int((live & ~floor).sum()))
                if k == 0:
                    continue
                dropped = torch.topk(drop_scores, k, largest=False).indices
                live[dropped] = False
                if self.p.algorithm == "rigl" and m.weight.grad is not None:
                    grow_scores = m.weight.grad.detach().abs().flatten().clone()
                else:
                    grow_scores = torch.rand(w.shape, generator=self.rng)
                grow_scores[live] = -1.0
                grow_scores[dropped] = -0.5  # regrow a just-dropped weight only when nothing else is left
                grown = torch.topk(grow_scores, k).indices
                live[grown] = True
                w[grown] = 0.0  # new connections start at zero (RigL)
                self.masks[i] = live.view_as(mask)
            self.updates += 1
        self.apply()


class SparseTraining(Method):
    name = "sparse-training"
    Params = SparseTrainingParams
    params: SparseTrainingParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        named = prunable(model)
        names, layers = [n for n, _ in named], [m for _, m in named]
        if p.from_scratch:
            reinitialise(model, ctx.train.seed + 2)
        shapes = [m.weight.shape for m in layers]
        guards = Guards.of(p)
        if p.distribution == "erk":
            ratios = [1 - d for d in erk_densities(shapes, 1 - p.sparsity, guards.densities(shapes))]
        else:
            ratios = [p.sparsity] * len(layers)
        if p.from_scratch:
            g = torch.Generator().manual_seed(ctx.train.seed)
            scores = [torch.rand(s, generator=g) for s in shapes]
        else:  # the trained weights' magnitudes, as the BatchNorm after them scales them
            scores = weight_scores(model, layers, "l1", None, None, ctx.example_input)
        masks = keep_masks(scores, [torch.ones(s) for s in shapes], ratios, "layer", guards, "sparse-training")
        check_alive(names, masks, "sparse-training")
        batch = ctx.finetune.batch_size or ctx.train.batch_size
        steps_per_epoch = math.ceil(len(ctx.data.x_train) / batch)
        hook = MaskedTraining(layers, masks, p, steps_per_epoch * p.epochs, guards)
        budget = sum(int(mk.sum()) for mk in masks)
        ctx.finetune_model(model, p.epochs, p.lr or ctx.train.lr, label=f"{p.algorithm}", after_step=hook)
        hook.apply()
        live = sum(int(m.weight.count_nonzero()) for m in layers)
        history = [{"epochs": p.epochs, "mask_updates": hook.updates, "budget": budget, "nonzero_after": live,
                    "accuracy": ctx.accuracy(model)}]
        ctx.progress(f"{p.algorithm}: {budget:,} live weights ({1 - p.sparsity:.1%}), {hook.updates} mask updates, "
                     f"accuracy {history[0]['accuracy']:.2%}")
        return self.report(model, ctx, t0, history, layer_sparsity=dict(zip(names, [round(r, 4) for r in ratios])))
