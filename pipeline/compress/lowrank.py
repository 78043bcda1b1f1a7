"""Low-rank factorisation by truncated SVD (Denton et al. 2014; Jaderberg et al. 2014).

Linear(in, out) becomes Linear(in, r) -> Linear(r, out); Conv2d(c, o, k) becomes Conv2d(c, r, k) ->
Conv2d(r, o, 1). The rank keeps ``energy`` of the squared singular values (or ``rank_ratio`` of the
full rank); a layer is factorised only when that makes it smaller.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .base import CompressContext, Method, StepReport, prunable
from .params import LowRankParams


def choose_rank(s: torch.Tensor, energy: float | None, ratio: float | None) -> int:
    if ratio is not None:
        return max(1, int(round(ratio * len(s))))
    cum = torch.cumsum(s**2, 0) / torch.sum(s**2)
    return int(torch.searchsorted(cum, torch.tensor(energy)).item()) + 1  # type: ignore[arg-type]


def factorise(layer: nn.Module, rank: int) -> nn.Sequential:
    w = layer.weight.detach()
    mat = w.flatten(1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]  # rank x in
    b = u[:, :rank] * root[None, :]  # out x rank
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    else:
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False, padding_mode=layer.padding_mode)
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
        first.weight.data.copy_(a.view(rank, *w.shape[1:]))
        second.weight.data.copy_(b.view(layer.out_channels, rank, 1, 1))
    if layer.bias is not None:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class LowRank(Method):
    name = "lowrank"
    Params = LowRankParams
    params: LowRankParams

    def apply(self, model: nn.Module, ctx: CompressContext) -> StepReport:
        p = self.params
        t0 = time.perf_counter()
        before = sum(q.numel() for q in model.parameters())
        decisions = []
        for name, layer in prunable(model):
            is_linear = isinstance(layer, nn.Linear)
            if p.layers == "linear" and not is_linear or p.layers == "conv" and is_linear:
                continue
            if not is_linear and (not isinstance(layer, nn.Conv2d) or layer.groups != 1):
                continue  # depthwise and grouped convolutions are already factorised
            if p.skip_classifier and is_linear and layer.out_features == ctx.data.num_classes:
                continue
            s = torch.linalg.svdvals(layer.weight.detach().flatten(1))
            rank = choose_rank(s, p.energy, p.rank_ratio)
            out_dim, in_dim = layer.weight.shape[0], layer.weight[0].numel()
            if rank * (out_dim + in_dim) >= out_dim * in_dim:
                decisions.append({"layer": name, "rank": rank, "full_rank": len(s), "factorised": False})
                continue
            _replace(model, name, factorise(layer, rank))
            decisions.append({"layer": name, "rank": rank, "full_rank": len(s), "factorised": True})
        after = sum(q.numel() for q in model.parameters())
        pruned_acc = ctx.accuracy(model)
        ctx.finetune_model(model, p.finetune_epochs, p.lr, label="lowrank")
        history = [{"params_before": before, "params_after": after, "accuracy_factorised": pruned_acc,
                    "accuracy_finetuned": ctx.accuracy(model)}]
        ctx.progress(f"lowrank: {sum(d['factorised'] for d in decisions)} layer(s) factorised, parameters "
                     f"{before:,} -> {after:,}, accuracy {pruned_acc:.2%} -> {history[0]['accuracy_finetuned']:.2%}")
        return self.report(model, ctx, t0, history, ranks=decisions)
