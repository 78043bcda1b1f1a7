"""Evaluation of real-scale inputs runs in batches bounded by bytes, not by a count made for 8x8 digits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.models import training


class Probe(nn.Module):
    """Records the largest batch it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8)
        self.head = nn.Linear(4, 5)
        self.largest = 0

    def forward(self, x):
        self.largest = max(self.largest, len(x))
        return self.head(self.conv(x).mean((2, 3)))


def test_a_224_image_batch_is_bounded_and_the_scores_do_not_change():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((60, 3, 224, 224)).astype(np.float32)
    model = Probe()
    scores = training.predict_logits(model, x)
    assert model.largest == training.eval_batch(x) < 60  # 27 images of 0.6 MB, not 512
    assert model.largest * x[0].nbytes <= training.EVAL_BATCH_BYTES
    with torch.no_grad():
        whole = model.eval()(torch.from_numpy(x))
    assert torch.allclose(scores, whole, atol=1e-5)


def test_small_inputs_keep_the_requested_batch():
    assert training.eval_batch(np.zeros((1, 1, 8, 8), np.float32), 512) == 512
    assert training.eval_batch(np.zeros((1, 1, 8, 8), np.float32), 64) == 64
