"""Structured pruning of channels, filters and neurons with Torch-Pruning's dependency graph.

The graph keeps the network valid across residual adds, concatenations, depthwise convolutions and
BatchNorm; the result is a genuinely smaller dense model. The target is either a channel ratio or a
MAC reduction (``macs_reduction: 2.5`` = 2.5x fewer MACs), found by bisection on the ratio.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..errors import CompressionError
from .base import CompressContext, Method, StepReport
from .params import StructuredParams
from .importance import accumulate_group_signal, get_criterion
from ..models.trace import locate


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


class StructuredPruner:
    """One Torch-Pruning MetaPruner over a model, with the data a criterion needs."""

    def __init__(self, model: nn.Module, p: StructuredParams, ctx: CompressContext, ratio: float, steps: int) -> None:
        import torch_pruning as tp

        self.model, self.p, self.ctx = model, p, ctx
        self.criterion = get_criterion(p.criterion)
        self.importance = self.criterion.group_importance()
        example = ctx.example_input

        self.ignored = classifier_layers(model, ctx.data.num_classes, p.ignore)

        def build():
            return tp.pruner.MetaPruner(
                model, example, importance=self.importance, global_pruning=p.global_pruning,
                pruning_ratio=ratio, max_pruning_ratio=p.max_layer_ratio, iterative_steps=steps,
                ignored_layers=self.ignored, round_to=p.round_to,
            )

        pruner, layer, exc = locate(model, build)
        if exc is not None:
            if isinstance(exc, CompressionError):
                raise exc
            where = f" in layer {layer!r}" if layer else ""
            raise CompressionError(f"cannot trace the model for structured pruning{where}: "
                                   f"{type(exc).__name__}: {exc}") from None
        self.pruner = pruner

    def step(self) -> None:
        x = torch.from_numpy(self.ctx.data.x_train[: self.p.score_samples])
        y = torch.from_numpy(self.ctx.data.y_train[: self.p.score_samples])
        accumulate_group_signal(self.model, self.importance, x, y, self.criterion.needs)
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)


def ratio_for_macs(model: nn.Module, p: StructuredParams, ctx: CompressContext, dense_macs: int) -> float:
    """The smallest channel ratio whose one-shot pruning (of a copy) meets the MAC target.

    MACs are not monotone in the ratio (a small layer may round to no pruning at a high ratio), so a
    coarse scan finds the first feasible ratio and bisection refines it against the last infeasible one.
    """
    goal = dense_macs / p.macs_reduction  # type: ignore[operator]

    def macs_at(ratio: float) -> int:
        probe = copy.deepcopy(model)
        StructuredPruner(probe, p, ctx, ratio, 1).step()
        return count_macs(probe, ctx.example_input)[0]

    grid = [round(r, 3) for r in torch.linspace(0.05, p.max_layer_ratio, 18).tolist()]
    lo, best = 0.0, None
    seen = {}
    for r in grid:
        seen[r] = macs_at(r)
        if seen[r] <= goal:
            best = r
            break
        lo = r
    if best is None:
        raise CompressionError(
            f"structured: {p.macs_reduction}x fewer MACs is out of reach with max_layer_ratio {p.max_layer_ratio} "
            f"(best {dense_macs / min(seen.values()):.2f}x); raise max_layer_ratio or lower the target")
    hi = best
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_at(mid) > goal else (lo, mid)
    return hi


class Structured(Method):
    name = "structured"
    Params = StructuredParams
    params: StructuredParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        model.eval()
        dense_macs, dense_params = count_macs(model, ctx.example_input)
        ratio = p.ratio if p.ratio is not None else ratio_for_macs(model, p, ctx, dense_macs)
        pruner = StructuredPruner(model, p, ctx, ratio, p.steps)
        widths = {n: _out(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        history = []
        for step in range(1, p.steps + 1):
            pruner.step()
            macs, params = count_macs(model, ctx.example_input)
            pruned_acc = ctx.accuracy(model)
            ctx.finetune_model(model, p.finetune_epochs, p.lr, label=f"structured step {step}/{p.steps}")
            acc = ctx.accuracy(model)
            history.append({"step": step, "macs": macs, "params": params, "mac_ratio": round(dense_macs / macs, 3),
                            "accuracy_pruned": pruned_acc, "accuracy_finetuned": acc})
            ctx.progress(f"structured ({p.criterion}) step {step}/{p.steps}: {dense_macs / macs:.2f}x fewer MACs, "
                         f"{dense_params / params:.2f}x fewer parameters, accuracy {pruned_acc:.2%} -> {acc:.2%}")
        macs, params = count_macs(model, ctx.example_input)
        untouched = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     and m not in pruner.ignored and _out(m) == widths[n]]
        if macs >= dense_macs:
            raise CompressionError(
                f"structured pruning removed no channels: the dependency graph could not follow the model through "
                f"layer(s) {untouched} (an operation outside autograd, or a custom op); rewrite it with torch ops "
                "or list it under 'ignore'")
        return self.report(model, ctx, t0, history, ratio=round(ratio, 4), macs_before=dense_macs, macs_after=macs,
                           mac_ratio=round(dense_macs / macs, 3), params_before=dense_params, untouched=untouched)


def _out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
