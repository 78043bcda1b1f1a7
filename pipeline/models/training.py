"""Training and evaluation loops shared by pre-training and fine-tuning.

Deterministic under a seed; runs on CUDA when present. Fine-tuning options: knowledge distillation
from a dense teacher, early stopping on a validation split carved from the training set (never the
test set), and a hook after every optimizer step (sparse training updates or re-applies masks there).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset

log = logging.getLogger(__name__)

#: progress callback: (epoch, epochs, loss) after each epoch
Progress = Callable[[int, int, float], None]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: inputs per inference batch at most (a 224x224x3 float32 image is 0.6 MB; its activations are ten times that)
EVAL_BATCH_BYTES = 16 * 2**20


def eval_batch(x: np.ndarray, batch_size: int = 512) -> int:
    """``batch_size``, lowered so a batch of ``x``'s samples holds at most :data:`EVAL_BATCH_BYTES` of input: 512
    digits at once, 27 images at 224x224x3, so evaluating a real-scale model stays within a device-sized RSS."""
    per_sample = max(1, int(np.prod(x.shape[1:])) * 4)
    return max(1, min(batch_size, EVAL_BATCH_BYTES // per_sample))


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    batch_size = eval_batch(x, batch_size)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.cat([model(torch.from_numpy(x[i:i + batch_size]).to(dev)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy as a fraction."""
    if len(x) == 0:
        return 0.0
    return float((predict_logits(model, x, batch_size).argmax(1).numpy() == y).mean())


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    lr: float
    batch_size: int = 64
    seed: int = 0
    teacher: nn.Module | None = None  # knowledge distillation (Hinton et al. 2015) when set
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    val_fraction: float = 0.0  # > 0: hold out this share of the training set for early stopping
    patience: int | None = None  # epochs without validation gain before stopping; best weights restored
    #: "cosine": the rate decays to zero over the run's optimizer steps (Loshchilov & Hutter 2017), the usual
    #: fine-tuning schedule after pruning; "constant": ``lr`` throughout
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class FitResult:
    loss: float
    epochs_run: int
    best_val_accuracy: float | None
    wall_s: float
    steps: int


def split_validation(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, np.ndarray, np.ndarray]:
    if fraction <= 0:
        return data, data.x_train[:0], data.y_train[:0]
    n_val = max(1, int(len(data.x_train) * fraction))
    order = np.random.default_rng(seed + 7919).permutation(len(data.x_train))
    val, tr = order[:n_val], order[n_val:]
    train_part = Dataset(data.name, data.x_train[tr], data.y_train[tr], data.x_test, data.y_test, data.num_classes)
    return train_part, data.x_train[val], data.y_train[val]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                    reduction="batchmean") * temperature**2
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, target)


def fit(model: nn.Module, data: Dataset, opts: FitOptions, progress: Progress | None = None,
        after_step: Callable[[int], None] | None = None) -> FitResult:
    """Adam + cross-entropy (or distillation). Masks installed by torch.nn.utils.prune stay enforced."""
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    dev = device()
    model.to(dev).train()
    teacher = opts.teacher.to(dev).eval() if opts.teacher is not None else None
    train_part, x_val, y_val = split_validation(data, opts.val_fraction, opts.seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    x, y = torch.from_numpy(train_part.x_train), torch.from_numpy(train_part.y_train)
    total_steps = opts.epochs * math.ceil(len(x) / opts.batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total_steps, 1))
             if opts.schedule == "cosine" else None)
    t0 = time.perf_counter()
    loss_value, best, best_state, stale, steps, epoch = float("nan"), None, None, 0, 0, 0
    for epoch in range(1, opts.epochs + 1):
        order = torch.from_numpy(rng.permutation(len(x)))
        total, n = 0.0, 0
        for i in range(0, len(x), opts.batch_size):
            idx = order[i:i + opts.batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = distillation_loss(logits, t_logits, yb, opts.kd_alpha, opts.kd_temperature)
            else:
                loss = F.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            steps += 1
            if after_step is not None:
                after_step(steps)
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        loss_value = total / max(n, 1)
        if progress is not None:
            progress(epoch, opts.epochs, loss_value)
        if len(x_val):
            acc = evaluate(model, x_val, y_val)
            if best is None or acc > best:
                best, best_state, stale = acc, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if opts.patience is not None and stale >= opts.patience:
                    log.info("early stop after epoch %d: validation accuracy %.4f did not improve", epoch, acc)
                    break
    if best_state is not None and opts.patience is not None:
        model.load_state_dict(best_state)
    model.to("cpu").eval()
    if teacher is not None:
        teacher.to("cpu")
    return FitResult(loss_value, epoch, best, time.perf_counter() - t0, steps)


def train(model: nn.Module, data: Dataset, epochs: int, lr: float, batch_size: int = 64, seed: int = 0,
          progress: Progress | None = None) -> dict[str, float]:
    """Plain training (pre-training a model before compression)."""
    r = fit(model, data, FitOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed), progress)
    return {"loss": r.loss, "wall_s": r.wall_s}
