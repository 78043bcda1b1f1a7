"""Training and evaluation loops shared by pre-training and fine-tuning (deterministic, CPU or CUDA)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .data import Dataset

log = logging.getLogger(__name__)

#: progress callback: (epoch, epochs, loss) after each epoch
Progress = Callable[[int, int, float], None]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy as a fraction."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(torch.from_numpy(x[i:i + batch_size]).to(dev))
        correct += int((logits.argmax(1).cpu() == torch.from_numpy(y[i:i + batch_size])).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Adam + cross-entropy. Masks installed by torch.nn.utils.prune stay enforced (they live in hooks)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = device()
    model.to(dev).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    t0 = time.perf_counter()
    loss_value = float("nan")
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        total, n = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        loss_value = total / n
        if progress is not None:
            progress(epoch + 1, epochs, loss_value)
    model.to("cpu").eval()
    return {"loss": loss_value, "wall_s": time.perf_counter() - t0}
