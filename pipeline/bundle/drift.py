"""The manifest's drift reference: what the exported model sees and answers on the data it was made on.

The bundle stage runs the model as the device will (the agent's own runtime, with the golden vectors' reference
semantics: :func:`pipeline.bundle.golden.reference_session`) over a bounded, seeded sample of the model's data, and
summarises the first input and the first output with :mod:`device_agent.drift`'s own per-batch helpers: the
device's monitor computes live exactly what is computed here.

Which data (deploy.yaml's ``drift.reference_split``): by default the held-out test split, drawn from the same
distribution as the training data the model was fitted to and its int8 calibration drew from, but not memorised.
A model is more confident on the samples it was fitted to, so a reference from them calls in-distribution traffic
drifted: on digits (an MLP trained 300 steps, four seeds) held-out traffic scored a confidence PSI of 0.19-0.40
against a training-split reference (above the 0.25 threshold in three of four) and 0.006-0.057 against a held-out
one; the input statistics and class shares agree either way. ``train`` takes the training split instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from device_agent.drift import (CONFIDENCE_BINS, SCORES, Reference, class_rows, confidence_bins,
                                looks_like_probabilities, top1)
from device_agent.errors import RuntimeBackendError

from ..errors import ExportError

log = logging.getLogger(__name__)

#: reference samples at most (deploy.yaml's drift.reference_samples)
REFERENCE_SAMPLES = 2000
#: samples a run, where the model's batch axis is free
BATCH = 32
#: the lowest std recorded (a constant channel): a live shift of it is then measured against this
STD_FLOOR = 1e-6
#: channel counts an image's channel axis has (grayscale, RGB, RGBA)
IMAGE_CHANNELS = (1, 3, 4)


def channel_axis(shape: tuple, layout: str | None = None) -> int | None:
    """The axis of an input of ``shape`` (batch first) whose entries are its channels: for 4-D inputs the
    preprocess spec's layout when it gives one, else the axis of 1, 3 or 4 entries (NCHW when both or neither
    look so); axis 1 for every other rank ([N, F] features, NCL sequences, NCDHW volumes); None below rank 2."""
    if len(shape) < 2:
        return None
    if len(shape) == 4:
        if layout in ("NCHW", "NHWC"):
            return 1 if layout == "NCHW" else 3
        if shape[1] not in IMAGE_CHANNELS and shape[3] in IMAGE_CHANNELS:
            return 3
    return 1


class ReferenceBuilder:
    """Accumulates a Reference over batches of (first input, first output). Memory: the running per-channel
    moments (Chan et al.'s parallel update, float64) and three numbers per sample of output (the top-1 class and
    its confidence read both ways), so the caller bounds it by the samples it feeds."""

    def __init__(self, axis: int, classes: int | None = None, bins: int = CONFIDENCE_BINS) -> None:
        """``classes``: the data's class count, when known: an output row of another width is no classifier's
        (a box regressor's four numbers are not four classes)."""
        self.axis, self.bins = axis, bins
        self.samples, self.n = 0, 0  # n: values per channel
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.classifier, self.probabilities, self.classes = True, True, classes
        self.dropped = 0  # samples whose output row is not finite: left out of the output statistics
        self._idx: list[np.ndarray] = []
        self._conf: dict[str, list[np.ndarray]] = {s: [] for s in SCORES}

    def add(self, x: np.ndarray, out: np.ndarray) -> None:
        """One batch; ValueError when the input has no such channel axis or holds NaN or infinity."""
        x = np.asarray(x)
        if x.ndim <= self.axis or x.dtype.kind not in "biuf" or x.size == 0:
            raise ValueError(f"an input of shape {x.shape}, dtype {x.dtype} has no channel axis {self.axis}")
        values = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis]).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("the reference inputs hold NaN or infinity")
        if self.mean is not None and len(self.mean) != values.shape[1]:
            raise ValueError(f"an input with {values.shape[1]} channels after {len(self.mean)}")
        n, mean = len(values), values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
        else:
            total, delta = self.n + n, mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
            self.n = total
        self.samples += x.shape[0]
        self._add_output(np.asarray(out))

    def _add_output(self, out: np.ndarray) -> None:
        if not self.classifier:
            return
        rows = class_rows(out, self.classes)
        if rows is None:  # not one score per class (or another width than before): no output statistics
            self.classifier = False
            return
        self.classes = rows.shape[1]
        finite = np.isfinite(rows).all(axis=1)
        self.dropped += int((~finite).sum())
        rows = rows[finite]
        if not len(rows):
            return
        self.probabilities = self.probabilities and looks_like_probabilities(rows)
        for scores in SCORES:
            got = top1(rows, scores)
            self._conf[scores].append(got[1] if got is not None else np.full(len(rows), np.nan))
        self._idx.append(rows.argmax(axis=1))

    def reference(self) -> Reference:
        if self.mean is None or self.m2 is None:
            raise ValueError("no reference samples")
        std = np.maximum(np.sqrt(self.m2 / self.n), STD_FLOOR)
        ref = Reference(self.samples, self.axis, _round(self.mean), _round(std))
        if not self.classifier or not self._idx or self.classes is None:
            return ref
        scores = "probabilities" if self.probabilities else "logits"
        idx, conf = np.concatenate(self._idx), np.concatenate(self._conf[scores])
        if not np.isfinite(conf).all():
            return ref
        classes = np.bincount(idx, minlength=self.classes) / len(idx)
        hist = np.bincount(confidence_bins(conf, self.bins), minlength=self.bins) / len(conf)
        return Reference(self.samples, self.axis, ref.mean, ref.std, scores, _round(classes), _round(hist))


def _round(values: np.ndarray) -> tuple[float, ...]:
    """Six significant digits: the manifest stays short, every figure far finer than drift can tell apart."""
    return tuple(float(f"{v:.6g}") for v in values)


def reference_inputs(data, split: str) -> np.ndarray:
    """The samples of ``data`` (a pipeline.data Dataset) the drift reference summarises: its ``split`` ("test" or
    "train"), or the training split when the test split is empty."""
    return data.x_test if split == "test" and len(data.x_test) else data.x_train


def drift_reference(model_path: Path, x: np.ndarray, *, layout: str | None = None, classes: int | None = None,
                    samples: int = REFERENCE_SAMPLES, seed: int = 0) -> tuple[Reference | None, str]:
    """The Reference of ``model_path`` over at most ``samples`` rows of ``x`` (drawn without replacement, seeded;
    read a batch at a time, so a memory-mapped split is never loaded whole), and a line saying what it holds or
    why there is none (no samples, an input without a channel axis, more channels than a reference holds).
    ``layout``: the preprocess spec's, when the data has one; ``classes``: the data's class count, when known
    (output statistics only for a first output of that many scores a row)."""
    from device_agent.drift import MAX_CHANNELS
    from device_agent.runtimes import get_runtime, runtime_for

    from .golden import reference_session

    if samples <= 0 or len(x) == 0:
        return None, "no drift reference (no reference samples)"
    axis = channel_axis(tuple(x.shape), layout)
    if axis is None or x.shape[axis] > MAX_CHANNELS:
        return None, (f"no drift reference: inputs of shape {tuple(x.shape[1:])} have no channel axis of at most "
                      f"{MAX_CHANNELS} entries")
    sess = reference_session(get_runtime(runtime_for(model_path)), model_path)
    name, shape = sess.inputs[0].name, sess.inputs[0].shape
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None  # a batch of N only
    batch = fixed or BATCH
    m = min(samples, len(x)) // batch * batch if fixed else min(samples, len(x))
    if m == 0:
        return None, f"no drift reference: the model takes batches of {fixed}, there are {len(x)} samples"
    rows = np.sort(np.random.default_rng(seed).choice(len(x), m, replace=False))
    builder = ReferenceBuilder(axis, classes)
    for i in range(0, m, batch):
        inp = np.asarray(x[rows[i:i + batch]], dtype=np.float32)
        try:
            builder.add(inp, sess.run({name: inp})[0])
        except (RuntimeBackendError, ValueError) as exc:
            raise ExportError(f"drift reference of {model_path.name}: {exc}") from None
    ref = builder.reference()
    what = (f"{len(ref.classes or ())} classes' shares and a {len(ref.confidence or ())}-bin confidence "
            f"histogram of its {ref.scores}" if ref.scores else "no output statistics (its first output is not one "
            f"score per class{f' of {classes}' if classes else ''})")
    dropped = f", {builder.dropped} non-finite output(s) left out" if builder.dropped else ""
    line = f"drift reference: {ref.samples} samples, {ref.channels} channel(s) on axis {axis}, {what}{dropped}"
    log.debug("%s: %s", model_path.name, ref.to_dict())
    return ref, line


__all__ = ["REFERENCE_SAMPLES", "ReferenceBuilder", "channel_axis", "drift_reference", "reference_inputs"]
