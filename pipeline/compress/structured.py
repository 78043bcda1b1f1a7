"""Structured pruning of channels, filters and neurons with Torch-Pruning's dependency graph.

The graph keeps the network valid across residual adds, concatenations, depthwise convolutions and
BatchNorm; the result is a genuinely smaller dense model. The target is either a channel ratio or a
MAC reduction (``macs_reduction: 2.5`` = 2.5x fewer MACs). The graph is traced once (:mod:`.channels`); the
MAC target is searched on a MAC model of the group widths, so a probe costs arithmetic, not a copy and a trace.

With ``steps: n`` step ``s`` aims at ``R ** (s / n)`` (ratios: ``ratio * s / n`` of the initial channels), so
the steps compose to the target whatever their number.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressionError
from ..models.trace import locate
from .base import CompressContext, Method, StepReport
from .channels import ChannelGroups, TargetOutOfReach
from .importance import accumulate_group_signal, get_criterion
from .params import StructuredParams

#: a measured MAC count this far above the step's goal (the MAC model missed a layer) is planned again
_REPLAN_ABOVE = 1e-3
_MAX_PASSES = 3
#: input elements per forward/backward when a criterion needs gradients (4 images of 3x224x224): the memory of
#: the backward pass stays flat whatever score_samples is
_GRAD_ELEMENTS = 4 * 3 * 224 * 224


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    result, layer, exc = locate(model, lambda: tp.utils.count_ops_and_params(model, example))
    if exc is not None:
        where = f" in layer {layer!r}" if layer else ""
        raise CompressionError(f"the model fails on an input of shape {tuple(example.shape)}{where}: "
                               f"{type(exc).__name__}: {exc}")
    macs, params = result
    return int(macs), int(params)


def classifier_layers(model: nn.Module, num_classes: int, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise CompressionError(f"structured.ignore: no module named {unknown}; modules: "
                               f"{[n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))][:20]}")
    out = [modules[n] for n in names]
    out += [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return out


def group_signal(model: nn.Module, importance, needs: str | None, x: torch.Tensor, y: torch.Tensor) -> None:
    """What a gradient-based group importance reads, computed a few samples at a time (the gradient of the mean
    loss over all of ``x``, as one batch would give, without one batch's activations)."""
    if needs != "grad":
        accumulate_group_signal(model, importance, x, y, needs)  # per sample already
        return
    model.eval()
    model.zero_grad(set_to_none=True)
    chunk = max(1, _GRAD_ELEMENTS // max(1, x[0].numel()))
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        (F.cross_entropy(model(xb), yb, reduction="sum") / len(x)).backward()


class Structured(Method):
    name = "structured"
    Params = StructuredParams
    params: StructuredParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        model.eval()
        example = ctx.example_input
        dense_macs, dense_params = count_macs(model, example)
        ignored = classifier_layers(model, ctx.data.num_classes, p.ignore)
        criterion = get_criterion(p.criterion)
        importance = criterion.group_importance()
        widths = {n: _out(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        ctx.progress(f"structured: tracing the dependency graph ({dense_macs / 1e6:.1f} M MACs)")
        groups = ChannelGroups(model, example, ignored, p.round_to, p.max_layer_ratio)
        x = torch.from_numpy(ctx.data.x_train[: p.score_samples])
        y = torch.from_numpy(ctx.data.y_train[: p.score_samples])
        history, ratio, probes = [], 0.0, 0
        for step in range(1, p.steps + 1):
            goal = None if p.macs_reduction is None else dense_macs / p.macs_reduction ** (step / p.steps)
            for attempt in range(1, _MAX_PASSES + 1):
                if criterion.needs:
                    ctx.progress(f"structured step {step}/{p.steps}: scoring channels ({p.criterion}, {len(x)} "
                                 "samples)")
                group_signal(model, importance, criterion.needs, x, y)
                scores = groups.scores(importance)
                model.zero_grad(set_to_none=True)
                ranking = scores if p.global_pruning else None
                if goal is None:
                    ratio = p.ratio * step / p.steps  # type: ignore[operator]
                    keeps = groups.keeps_at(ratio, ranking)
                else:
                    try:  # plan the whole cut, then take this step's share of it
                        keeps, ratio, n = groups.plan_for_macs(dense_macs / p.macs_reduction, ranking)
                        if step < p.steps:
                            keeps, more = groups.plan_toward(goal, keeps)
                            n += more
                    except TargetOutOfReach as exc:
                        raise CompressionError(
                            f"structured: {p.macs_reduction}x fewer MACs is out of reach with max_layer_ratio "
                            f"{p.max_layer_ratio} (best {dense_macs / exc.best_macs:.2f}x); raise max_layer_ratio "
                            "or lower the target") from None
                    probes += n
                predicted = groups.predict(keeps)
                groups.prune(keeps, scores)
                if goal is None or groups.macs <= goal * (1 + _REPLAN_ABOVE):
                    break
                ctx.progress(f"structured step {step}/{p.steps}: {groups.macs / 1e6:.1f} M MACs, above the step's "
                             f"goal {goal / 1e6:.1f} M (predicted {predicted / 1e6:.1f} M); planning again")
            macs, params = count_macs(model, example)
            pruned_acc = ctx.accuracy(model)
            ctx.finetune_model(model, p.finetune_epochs, p.lr, label=f"structured step {step}/{p.steps}")
            acc = ctx.accuracy(model)
            history.append({"step": step, "macs": macs, "params": params, "mac_ratio": round(dense_macs / macs, 3),
                            "ratio": round(ratio, 4), "accuracy_pruned": pruned_acc, "accuracy_finetuned": acc})
            ctx.progress(f"structured ({p.criterion}) step {step}/{p.steps}: {dense_macs / macs:.2f}x fewer MACs, "
                         f"{dense_params / params:.2f}x fewer parameters, accuracy {pruned_acc:.2%} -> {acc:.2%}")
        macs, params = count_macs(model, example)
        untouched = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     and m not in ignored and _out(m) == widths[n]]
        if macs >= dense_macs:
            raise CompressionError(
                f"structured pruning removed no channels: the dependency graph could not follow the model through "
                f"layer(s) {untouched} (an operation outside autograd, or a custom op); rewrite it with torch ops "
                "or list it under 'ignore'")
        return self.report(model, ctx, t0, history, ratio=round(ratio, 4), macs_before=dense_macs, macs_after=macs,
                           mac_ratio=round(dense_macs / macs, 3), params_before=dense_params, untouched=untouched,
                           groups=len(groups.groups), search_probes=probes)


def _out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
