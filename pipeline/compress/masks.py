"""Unstructured masks: rank scores, keep the top share, install with torch.nn.utils.prune, refuse dead layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import CompressionError


def keep_masks(scores: list[torch.Tensor], weights: list[torch.Tensor], sparsity: float | list[float],
               scope: str) -> list[torch.Tensor]:
    """Keep-masks removing the ``sparsity`` share of lowest scores, over all layers (``global``) or per layer.

    Weights already at zero rank below every live weight, so pruning never revives them.
    """
    scores = [torch.where(w == 0, torch.full_like(s, -1.0), s.float()) for s, w in zip(scores, weights)]
    if scope == "layer" or isinstance(sparsity, list):
        ratios = sparsity if isinstance(sparsity, list) else [sparsity] * len(scores)
        out = []
        for s, r in zip(scores, ratios):
            k = int(round(r * s.numel()))
            mask = torch.ones(s.numel(), dtype=torch.bool)
            if k:
                mask[torch.topk(s.flatten(), k, largest=False).indices] = False
            out.append(mask.view_as(s))
        return out
    flat = torch.cat([s.flatten() for s in scores])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = False
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset:offset + s.numel()].view_as(s))
        offset += s.numel()
    return out


def check_alive(names: list[str], masks: list[torch.Tensor], where: str) -> None:
    dead = [n for n, m in zip(names, masks) if not bool(m.any())]
    if dead:
        raise CompressionError(f"{where} would remove every weight of layer(s) {dead}; lower the sparsity, "
                               "use scope: layer, or exclude those layers")


def fold(layers: list[nn.Module]) -> None:
    """Make installed masks permanent (weights stay zero, the reparametrisation goes)."""
    for m in layers:
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def install(layers: list[nn.Module], masks: list[torch.Tensor]) -> None:
    """Replace any previous mask: fine-tuning then keeps pruned weights at zero."""
    fold(layers)
    for m, mask in zip(layers, masks):
        prune.custom_from_mask(m, "weight", mask)
