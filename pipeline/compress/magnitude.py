"""Magnitude pruning (Han et al. 2015), one-shot or iterative on a gradual schedule (Zhu & Gupta 2017).

Masks are installed with ``torch.nn.utils.prune`` so fine-tuning keeps pruned weights at zero;
they are made permanent at the end of the step.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import prune

from ..training import evaluate, train
from .base import METHODS, CompressContext, Method, Params, StepReport, model_stats, prunable


class MagnitudeParams(Params):
    scope: Literal["global", "layer"] = "global"
    sparsity: float = Field(gt=0, lt=1, description="fraction of weights set to zero at the end")
    steps: int = Field(1, ge=1, le=100, description="1 = one-shot; more = iterative")
    schedule: Literal["polynomial", "linear"] = "polynomial"
    finetune_epochs: int = Field(1, ge=0, le=100, description="fine-tuning epochs after each step")
    lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default: train.lr / 2)")


def schedule(final: float, steps: int, kind: str) -> list[float]:
    """Sparsity after each step. Polynomial: s_t = s_f (1 - (1 - t/n)^3), pruning fast early (Zhu & Gupta)."""
    if kind == "linear":
        return [final * (t + 1) / steps for t in range(steps)]
    return [final * (1 - (1 - (t + 1) / steps) ** 3) for t in range(steps)]


def magnitude_masks(layers: list[nn.Module], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Keep-masks that zero the ``sparsity`` fraction of smallest |w|, over all layers or per layer."""
    weights = [m.weight.detach().abs() for m in layers]
    if scope == "layer":
        out = []
        for w in weights:
            k = int(round(sparsity * w.numel()))
            mask = torch.ones_like(w, dtype=torch.bool).flatten()
            if k:
                mask[torch.topk(w.flatten(), k, largest=False).indices] = False
            out.append(mask.view_as(w))
        return out
    flat = torch.cat([w.flatten() for w in weights])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = False
    out, offset = [], 0
    for w in weights:
        out.append(keep[offset:offset + w.numel()].view_as(w))
        offset += w.numel()
    return out


@METHODS.register("magnitude")
class Magnitude(Method):
    name = "magnitude"
    Params = MagnitudeParams
    params: MagnitudeParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        layers = [m for _, m in prunable(model)]
        lr = p.lr or ctx.train.lr / 2
        history = []
        for step, target in enumerate(schedule(p.sparsity, p.steps, p.schedule), start=1):
            for m in layers:  # fold the previous mask into the weight before re-ranking
                if prune.is_pruned(m) and hasattr(m, "weight_mask"):
                    prune.remove(m, "weight")
            for m, mask in zip(layers, magnitude_masks(layers, target, p.scope)):
                prune.custom_from_mask(m, "weight", mask)
            pruned_acc = evaluate(model, ctx.data.x_test, ctx.data.y_test)
            if p.finetune_epochs:
                train(model, ctx.data, p.finetune_epochs, lr, ctx.train.batch_size, ctx.train.seed + step)
            acc = evaluate(model, ctx.data.x_test, ctx.data.y_test)
            history.append({"step": step, "sparsity": round(target, 4), "accuracy_pruned": pruned_acc,
                            "accuracy_finetuned": acc})
            ctx.progress(f"magnitude step {step}/{p.steps}: sparsity {target:.1%}, accuracy {pruned_acc:.2%} "
                         f"-> {acc:.2%} after {p.finetune_epochs} epoch(s)")
        for m in layers:
            prune.remove(m, "weight")
        stats = model_stats(model)
        return StepReport(
            method=self.name, params=p.model_dump(), accuracy=history[-1]["accuracy_finetuned"],
            params_total=stats["params"], nonzero=stats["nonzero_params"], wall_s=round(time.perf_counter() - t0, 3),
            layers=stats["layers"], history=history,
        )
