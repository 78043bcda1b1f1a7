"""What pruning a layer that a BatchNorm follows must account for.

A BatchNorm rescales each output channel of the layer before it, so that layer's raw weight magnitudes
say nothing about its effect: ``bn_scales`` finds the factor (|gamma| / sigma per channel) for magnitude
scores to fold in. Pruning shrinks the variance a BatchNorm normalises by, so its running statistics no
longer fit: ``recalibrate`` re-estimates them on training samples (the adaptive BatchNorm of Li et al.
2020, EagleEye), before a pruned model is judged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def bn_scales(model: nn.Module, layers: list[nn.Module], example: torch.Tensor) -> list[torch.Tensor | None]:
    """Per output channel, |gamma| / sqrt(running_var + eps) of the BatchNorm that reads the layer's output
    directly (None where none does): the factor the BatchNorm multiplies that channel by at inference, so a
    weight's effective magnitude is |w| times it. Found by one forward pass, whatever the model's wiring."""
    produced: dict[int, tuple[torch.Tensor, int]] = {}  # id(output) -> (output kept alive, layer index)
    found: dict[int, torch.Tensor] = {}
    index = {id(m): i for i, m in enumerate(layers)}

    def after_layer(module, inputs, output):
        produced[id(output)] = (output, index[id(module)])

    def before_bn(module, inputs):
        hit = produced.get(id(inputs[0]))
        if hit is not None and module.track_running_stats and module.running_var is not None:
            gamma = module.weight.abs() if module.affine else torch.ones_like(module.running_var)
            found.setdefault(hit[1], gamma / torch.sqrt(module.running_var + module.eps))

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return [None] * len(layers)
    hooks = [m.register_forward_hook(after_layer) for m in layers]
    hooks += [m.register_forward_pre_hook(before_bn) for m in bns]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [found.get(i) for i in range(len(layers))]


def fold_bn(scores: list[torch.Tensor], scales: list[torch.Tensor | None], power: int) -> list[torch.Tensor]:
    """Scores of the weights as the BatchNorm after them scales them: score * scale^power per output channel."""
    out = []
    for s, c in zip(scores, scales):
        if c is None or c.numel() != s.shape[0]:
            out.append(s)
        else:
            out.append(s * c.to(s.dtype).view(-1, *[1] * (s.dim() - 1)) ** power)
    return out


@torch.no_grad()
def recalibrate(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> None:
    """Every BatchNorm's running mean and variance re-estimated on ``x`` (a plain average over the batches);
    weights and every other module's mode untouched."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns or len(x) == 0:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        dev = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(x[i:i + batch_size]).to(dev))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, mode in modes.items():
            m.train(mode)


@contextmanager
def statistics_kept(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm's running statistics as they were when the block ends (a scan recalibrates, then undoes)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
