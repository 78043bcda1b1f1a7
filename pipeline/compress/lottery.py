"""Lottery tickets by iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019;
Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis").

The network is re-initialised (seeded), trained densely while the weights at ``rewind_steps`` are
saved, then each round removes ``prune_per_round`` of the remaining weights by magnitude, rewinds
the survivors to their saved values and retrains. A *winning ticket* matches the dense accuracy
within ``tolerance``; the step keeps the sparsest winning ticket (or, if none wins, the best round).
Magnitudes are those the following BatchNorm gives the weights, ranked globally as LAMP scores, with the
layer caps and row floors of every unstructured mask.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..models.training import fit
from .base import CompressContext, Method, StepReport, prunable
from .params import LotteryParams
from .importance import weight_scores
from .masks import Guards, check_alive, fold, install, keep_masks


def reinitialise(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class Lottery(Method):
    name = "lottery"
    Params = LotteryParams
    params: LotteryParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        named = prunable(model)
        names, layers = [n for n, _ in named], [m for _, m in named]
        lr = p.lr or ctx.train.lr
        if p.reinit:
            reinitialise(model, ctx.train.seed + 1)
        saved: dict[str, torch.Tensor] = {}

        def save_rewind_point(step: int) -> None:
            if step == p.rewind_steps:
                saved.update({k: v.detach().clone() for k, v in model.state_dict().items()})

        if p.rewind_steps == 0:
            save_rewind_point(0)
        opts = ctx.fit_options(p.epochs, lr, distill=False)
        fit(model, ctx.data, opts, after_step=save_rewind_point)
        if not saved:  # fewer steps than rewind_steps: rewind to the end of dense training
            saved.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        dense_acc = ctx.accuracy(model)
        ctx.progress(f"lottery: dense run {dense_acc:.2%}, rewind point at step {p.rewind_steps}")
        history = [{"round": 0, "sparsity": 0.0, "accuracy": dense_acc, "winning": True}]
        best_state, best = copy.deepcopy(model.state_dict()), history[0]
        total = sum(m.weight.numel() for m in layers)
        for rnd in range(1, p.rounds + 1):
            fold(layers)
            target = 1 - (1 - p.prune_per_round) ** rnd
            scores = weight_scores(model, layers, "l1", None, None, ctx.example_input, p.bn_fold,
                                   p.normalise if p.scope == "global" else "none")
            masks = keep_masks(scores, [m.weight.detach() for m in layers], target, p.scope, Guards.of(p),
                               f"lottery round {rnd}")
            check_alive(names, masks, f"lottery round {rnd}")
            with torch.no_grad():  # rewind the survivors
                for name, m in named:
                    m.weight.copy_(saved[f"{name}.weight"])
                state = model.state_dict()
                for k, v in saved.items():
                    if not k.endswith(".weight") or k.rsplit(".", 1)[0] not in names:
                        state[k].copy_(v)
            install(layers, masks)
            fit(model, ctx.data, ctx.fit_options(p.epochs, lr, distill=False))
            acc = ctx.accuracy(model)
            sparsity = 1 - sum(int(mk.sum()) for mk in masks) / total
            winning = acc >= dense_acc - p.tolerance
            history.append({"round": rnd, "sparsity": round(sparsity, 4), "accuracy": acc, "winning": winning})
            ctx.progress(f"lottery round {rnd}/{p.rounds}: {1 - sparsity:.1%} of weights, accuracy {acc:.2%}"
                         f"{' (winning ticket)' if winning else ''}")
            if winning or not best["winning"] and acc > best["accuracy"]:
                fold(layers)
                best_state, best = copy.deepcopy(model.state_dict()), history[-1]
        fold(layers)
        model.load_state_dict(best_state)
        winners = [h for h in history if h["winning"] and h["round"] > 0]
        return self.report(model, ctx, t0, history, dense_accuracy=dense_acc,
                           winning_ticket=(max(winners, key=lambda h: h["sparsity"]) if winners else None),
                           kept=best)
