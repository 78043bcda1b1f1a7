"""Unstructured masks: rank scores, keep the top share, install with torch.nn.utils.prune, refuse dead layers.

``Guards`` are what no mask does unless the recipe asks: take a layer past its sparsity cap, or take an
output channel (a classifier row: a class) below its floor of weights. A guarded mask still reaches the
asked overall sparsity: what a capped layer cannot give, the layers with room give instead (water-filling
over a global ranking, or spread over the other layers when each layer has its own ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import CompressionError


@dataclass(frozen=True)
class Guards:
    #: no layer loses more than this share of its weights
    max_layer_sparsity: float = 1.0
    #: every output channel / classifier row keeps at least this many weights (0: rows may empty)
    min_row_weights: int = 0

    @classmethod
    def of(cls, params) -> Guards:
        """The guards a method's parameters ask for (``GuardParams``)."""
        return cls(params.max_layer_sparsity, params.min_row_weights)

    def protected(self, score: torch.Tensor) -> torch.Tensor:
        """The ``min_row_weights`` best-scoring weights of every row (output channel), never pruned."""
        keep = torch.zeros(score.numel(), dtype=torch.bool)
        if self.min_row_weights <= 0 or score.dim() < 2:
            return keep.view_as(score)
        rows = score.flatten(1)
        m = min(self.min_row_weights, rows.shape[1])
        idx = torch.topk(rows, m, dim=1).indices + torch.arange(rows.shape[0])[:, None] * rows.shape[1]
        keep[idx.flatten()] = True
        return keep.view_as(score)

    def limit(self, protected: torch.Tensor) -> int:
        """How many weights of a layer may go."""
        n = protected.numel()
        return min(math.floor(self.max_layer_sparsity * n + 1e-9), n - int(protected.sum()))

    def densities(self, shapes: list[torch.Size]) -> list[float]:
        """The least density each layer keeps: its cap and its rows' floor."""
        out = []
        for s in shapes:
            n = math.prod(s)
            rows = min(self.min_row_weights, math.prod(s[1:])) * s[0] if len(s) > 1 else 0
            out.append(max(1 - math.floor(self.max_layer_sparsity * n + 1e-9) / n, rows / n))
        return out


NO_GUARDS = Guards()


def apportion(shares: list[float]) -> list[int]:
    """Whole counts summing to ``round(sum(shares))``, each the floor of its share or one more (largest
    remainders first), so per-layer rounding never moves the total."""
    counts = [math.floor(x + 1e-9) for x in shares]
    extra = int(round(sum(shares))) - sum(counts)
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[:max(extra, 0)]:
        counts[i] += 1
    return counts


def spread(wanted: list[int], limits: list[int], where: str) -> list[int]:
    """Per-layer counts to prune: each layer's wish within its limit, any shortfall taken from the layers
    with room in proportion to their room, so the total stays ``sum(wanted)``."""
    counts = [min(w, lim) for w, lim in zip(wanted, limits)]
    short = sum(wanted) - sum(counts)
    room = [lim - c for lim, c in zip(limits, counts)]
    if short > sum(room):
        raise CompressionError(f"{where}: {sum(wanted):,} weights must go, the layer caps and row floors allow "
                               f"{sum(limits):,}; lower the sparsity, raise max_layer_sparsity or lower "
                               "min_row_weights")
    while short > 0:
        free = sum(room)
        step = [min(r, max(1, math.floor(short * r / free))) if r else 0 for r in room]
        for i, s in enumerate(step):
            s = min(s, short)
            counts[i] += s
            room[i] -= s
            short -= s
    return counts


def global_counts(scores: list[torch.Tensor], limits: list[int], k: int, where: str) -> list[int]:
    """Per-layer counts for the ``k`` lowest scores over all layers, no layer past its limit (a capped layer
    leaves the ranking and the rest share what it could not give)."""
    if k > sum(limits):
        raise CompressionError(f"{where}: {k:,} weights must go, the layer caps and row floors allow "
                               f"{sum(limits):,}; lower the sparsity, raise max_layer_sparsity or lower "
                               "min_row_weights")
    counts = [0] * len(scores)
    open_ = list(range(len(scores)))
    left = k
    while left > 0 and open_:
        flat = torch.cat([scores[i].flatten() for i in open_])
        owner = torch.cat([torch.full((scores[i].numel(),), j) for j, i in enumerate(open_)])
        taken = torch.bincount(owner[torch.topk(flat, left, largest=False).indices], minlength=len(open_))
        over = [i for j, i in enumerate(open_) if int(taken[j]) > limits[i]]
        if not over:
            for j, i in enumerate(open_):
                counts[i] = int(taken[j])
            return counts
        for i in over:
            counts[i] = limits[i]
            left -= limits[i]
        open_ = [i for i in open_ if i not in over]
    return counts


def keep_masks(scores: list[torch.Tensor], weights: list[torch.Tensor], sparsity: float | list[float],
               scope: str, guards: Guards = NO_GUARDS, where: str = "pruning") -> list[torch.Tensor]:
    """Keep-masks removing the ``sparsity`` share of lowest scores, over all layers (``global``) or per layer.

    Weights already at zero rank below every live weight, so pruning never revives them (unless a row's floor
    needs one back). ``guards`` cap each layer and keep a floor per row, the total still reaching the target.
    """
    scores = [torch.where(w == 0, torch.full_like(s, -1.0), s.float()) for s, w in zip(scores, weights)]
    protected = [guards.protected(s) for s in scores]
    limits = [guards.limit(p) for p in protected]
    ranked = [torch.where(p, torch.full_like(s, math.inf), s) for s, p in zip(scores, protected)]
    if scope == "layer" or isinstance(sparsity, list):
        ratios = sparsity if isinstance(sparsity, list) else [sparsity] * len(scores)
        counts = spread(apportion([r * s.numel() for r, s in zip(ratios, scores)]), limits, where)
    else:
        total = sum(s.numel() for s in scores)
        counts = global_counts(ranked, limits, int(round(sparsity * total)), where)
    out = []
    for s, k in zip(ranked, counts):
        mask = torch.ones(s.numel(), dtype=torch.bool)
        if k:
            mask[torch.topk(s.flatten(), k, largest=False).indices] = False
        out.append(mask.view_as(s))
    return out


def check_alive(names: list[str], masks: list[torch.Tensor], where: str) -> None:
    dead = [n for n, m in zip(names, masks) if not bool(m.any())]
    if dead:
        raise CompressionError(f"{where} would remove every weight of layer(s) {dead}; lower the sparsity, "
                               "use scope: layer, keep min_row_weights above 0, or exclude those layers")


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
