"""The channel block a device class's kernels compute in, chosen from what its devices measured.

Runtimes compute convolutions in blocks of channels: onnxruntime's NCHWc kernels in blocks of 16 floats on
AVX-512 and 8 on AVX2, XNNPACK's and TFLite's micro-kernels in tiles of 4 to 16 output channels on ARM, wider ones
for int8. A layer whose width is not a whole number of blocks costs what the next whole number costs: on this
EPYC (AVX-512) a 3x3 convolution at 56x56 ran 2.13 ms with 56 channels and 2.17 ms with 64, 1.18 / 1.19 ms with
40 / 48, 0.54 / 0.53 ms with 24 / 32. So a structured cut to widths that are multiples of 8 can save nothing there.

The block belongs to the device and its runtime, so it is not assumed: for each candidate in
:data:`..kernels.BLOCKS`, the dense and depthwise convolutions the suite timed (its widths fall on either side of
every block) are fitted as the predictor fits them, a random forest per kind over the time per unit of work, with
work counted in whole blocks of that size and features that say nothing of how widths fall on blocks. Such a forest
follows any smooth dependence on the sizes but not a staircase in the widths, so the right block explains the times
best, out of bag. The errors are trimmed (interference only ever adds time, so the slowest tenth is dropped) and
the smallest candidate within :data:`TIE` of the best wins: a suite with no odd widths, or a device without
blocks, gives 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import BLOCKS, Kernel

#: a candidate within this share of the best residual counts as good as it (the smallest such block is taken)
TIE = 0.05
#: kernels faster than this (microseconds) are left out: their time is overhead more than channels
MIN_US = 5.0
#: fewer usable samples of a precision than this: its block is the other precision's (or 1)
MIN_SAMPLES = 24
#: the share of the largest residuals left out of a score
TRIM = 0.1
#: the indices of ``Kernel.features`` that tell how channels fall on 16-channel blocks (left out of a score)
_RESIDUES = (9, 10)


def score(kernels: list[Kernel], us: np.ndarray, block: int) -> float:
    """How well the predictor's kind of forest explains the times (``us``) when work is counted in ``block``-channel
    blocks: the trimmed mean squared out-of-bag error of log(time per work), on features that say nothing of how
    the widths fall on blocks (a forest can learn a power law in the widths, not a staircase it is not shown)."""
    from sklearn.ensemble import RandomForestRegressor

    x = np.array([[f for i, f in enumerate(k.features(1)) if i not in _RESIDUES] for k in kernels])
    y = np.log(us / np.array([k.work(block) for k in kernels]))
    forest = RandomForestRegressor(n_estimators=60, min_samples_leaf=2, random_state=0, n_jobs=1, oob_score=True)
    r = np.sort((y - forest.fit(x, y).oob_prediction_) ** 2)
    return float(r[:max(1, int(round(len(r) * (1 - TRIM))))].mean())


def _usable(samples: list[dict[str, Any]], int8: bool) -> dict[str, tuple[list[Kernel], np.ndarray]]:
    out: dict[str, tuple[list[Kernel], list[float]]] = {}
    for s in samples:
        k = Kernel(**s["kernel"])
        if k.int8 != int8 or s["us"] < MIN_US or k.kind not in ("conv", "dwconv") or k.groups != 1 or k.cin < 4:
            continue
        out.setdefault(k.kind, ([], []))
        out[k.kind][0].append(k)
        out[k.kind][1].append(float(s["us"]))
    return {kind: (ks, np.array(us)) for kind, (ks, us) in out.items() if len(ks) > 8}


def choose_block(samples: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, Any]]:
    """Per precision, the block the samples ({kernel, us}) are best explained by, and the evidence: per precision
    the samples used and each candidate's score (None where there were too few samples to choose)."""
    blocks: dict[str, int] = {}
    evidence: dict[str, Any] = {}
    for precision, int8 in (("fp32", False), ("int8", True)):
        by_kind = _usable(samples, int8)
        n = sum(len(ks) for ks, _ in by_kind.values())
        if n < MIN_SAMPLES:
            evidence[precision] = {"samples": n, "scores": None}
            continue
        scores = {b: sum(score(ks, us, b) * len(ks) for ks, us in by_kind.values()) / n for b in BLOCKS}
        best = min(scores.values())
        blocks[precision] = min(b for b, v in scores.items() if v <= best * (1 + TIE))
        evidence[precision] = {"samples": n, "scores": {str(b): round(v, 5) for b, v in scores.items()}}
    fallback = blocks.get("fp32", blocks.get("int8", 1))
    chosen = {p: blocks.get(p, fallback) for p in ("fp32", "int8")}
    for p in chosen:
        evidence[p]["block"] = chosen[p]
    return chosen, evidence


__all__ = ["MIN_SAMPLES", "TIE", "choose_block", "score"]
