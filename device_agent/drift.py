"""Drift: how far a device's live inputs and answers have moved from the data its model was made on.

One module, both ends of the wire. The host summarises the model's reference data (the first input and first
output of the exported model over its training/calibration data: :mod:`pipeline.bundle.drift`, with this
module's per-batch helpers) into a :class:`Reference` that the signed manifest carries (``reference``); the agent
keeps windowed statistics of live requests (:class:`DriftMonitor`) and reports their :class:`DriftScores` with its
metrics; :class:`Thresholds` (deploy.yaml's ``drift:``) say which scores raise events (:func:`events`).

The reference, as the manifest carries it::

    {"samples": 2000,                       # reference samples summarised
     "window": 1000,                        # optional: requests the device's monitor scores over
     "input": {"channel_axis": 1,           # the first input's axis (batch is 0) whose entries are channels:
                                            #   1 for NCHW (and [N, F] features), 3 for NHWC
               "mean": [0.48, 0.45, 0.40],  # per channel, over every sample and position, after preprocessing
               "std": [0.23, 0.22, 0.22]},  # population std, > 0
     "output": {"scores": "logits",         # or "probabilities": top-1 confidence is max(softmax(row)), or max(row)
                "classes": [0.1, ...],      # share of the samples whose top-1 is each class (sums to 1)
                "confidence": [0, ...]}}    # share whose top-1 confidence falls in each of len() equal bins on [0, 1]

``output`` is absent when the first output is not one score per class (a detector, a segmenter, a regressor):
its row, flattened after the batch axis, must be 2..MAX_CLASSES wide with at most one axis longer than 1.
:meth:`Reference.from_dict` is total: any value gives a Reference or a ProtocolError naming the field.

Scores (each over the monitor's window):

- ``psi_outputs`` / ``psi_confidence``: the population stability index of the live predicted-class shares /
  confidence histogram against the reference's, ``sum((a - e) * ln(a / e))``, with every share floored at
  ``EPS`` (1e-4) so an empty bin on either side counts as 0.01 % instead of dividing by zero. Conventional
  reading (Siddiqi 2006; Yurdakul 2018): below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 significant.
  Under no drift it is about ``(bins - 1) / window_samples`` from sampling alone, so keep the window well above
  the class count (1000 classes want many thousand samples before the PSI means anything).
- ``mean_shift``: per input channel ``|mean_live - mean_ref| / std_ref`` (a standardised mean difference, in
  units of the reference's per-value spread) and its maximum ``max_mean_shift``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError
from .protocol import short

#: shares floored at this in a PSI (an empty bin counts as 0.01 %)
EPS = 1e-4
#: bounds on a reference: channels of the first input, classes of the first output, confidence bins
MAX_CHANNELS, MAX_CLASSES, MAX_BINS = 4096, 10_000, 100
#: the host's confidence histogram: 10 equal bins on [0, 1]
CONFIDENCE_BINS = 10
SCORES = ("logits", "probabilities")
#: how far from 1 a list of shares may sum (rounding to 6 significant digits on the host)
SUM_TOLERANCE = 1e-3
#: the monitor's window is this many slots; see DriftMonitor
SLOTS = 8
MAX_WINDOW = 10_000_000
_KEYS = {"": ("samples", "input", "output", "window"), "input": ("channel_axis", "mean", "std"),
         "output": ("scores", "classes", "confidence")}


# --------------------------------------------------------------------------- the schema

@dataclass(frozen=True)
class Reference:
    """Reference statistics of a model's first input and first output (see the module's docstring)."""

    samples: int
    channel_axis: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scores: str | None = None  # one of SCORES; None: no output block (not a classifier)
    classes: tuple[float, ...] | None = None
    confidence: tuple[float, ...] | None = None
    window: int | None = None  # requests the device's monitor scores over (deploy.yaml drift.window); None: its own

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_dict(cls, obj: Any, where: str = "reference") -> "Reference":
        """Total: any value gives a Reference or ProtocolError naming the field."""
        _keys(obj, "", where)
        samples = obj.get("samples")
        if not _int(samples) or not 1 <= samples < 2**53:
            raise ProtocolError(f"{where}.samples: expected an integer in [1, 2**53), got {short(samples, 60)}")
        inp = obj.get("input")
        _keys(inp, "input", where)
        axis = inp.get("channel_axis")
        if not _int(axis) or not 1 <= axis <= 7:
            raise ProtocolError(f"{where}.input.channel_axis: expected an integer in [1, 7] (the batch is axis 0), "
                                f"got {short(axis, 60)}")
        mean = _numbers(inp.get("mean"), f"{where}.input.mean", 1, MAX_CHANNELS)
        std = _numbers(inp.get("std"), f"{where}.input.std", 1, MAX_CHANNELS)
        if len(std) != len(mean):
            raise ProtocolError(f"{where}.input.std: {len(std)} values for {len(mean)} channel means")
        if any(s <= 0 for s in std):
            raise ProtocolError(f"{where}.input.std: every value must be > 0, got {short(list(std), 60)}")
        window = obj.get("window")
        if window is not None and (not _int(window) or not 1 <= window <= MAX_WINDOW):
            raise ProtocolError(f"{where}.window: expected an integer in [1, {MAX_WINDOW}], got {short(window, 60)}")
        out = obj.get("output")
        if out is None:
            return cls(samples, axis, mean, std, window=window)
        _keys(out, "output", where)
        scores = out.get("scores")
        if not isinstance(scores, str) or scores not in SCORES:
            raise ProtocolError(f"{where}.output.scores: expected one of {', '.join(SCORES)}, got {short(scores, 60)}")
        return cls(samples, axis, mean, std, scores,
                   _shares(out.get("classes"), f"{where}.output.classes", MAX_CLASSES),
                   _shares(out.get("confidence"), f"{where}.output.confidence", MAX_BINS), window)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, the inverse of ``from_dict`` (``Reference.from_dict(r.to_dict()) == r``)."""
        out: dict[str, Any] = {"samples": self.samples, "input": {"channel_axis": self.channel_axis,
                                                                  "mean": list(self.mean), "std": list(self.std)}}
        if self.scores is not None:
            out["output"] = {"scores": self.scores, "classes": list(self.classes or ()),
                             "confidence": list(self.confidence or ())}
        if self.window is not None:
            out["window"] = self.window
        return out

    def check_io(self, io: Any, where: str = "manifest: reference") -> None:
        """ProtocolError unless the reference fits the model's ``io`` (as a manifest gives it) where the shapes
        are numbers: the first input has ``channel_axis`` and that many channels on it, the first output's row
        is as wide as ``classes``."""
        shape = _first_shape(io, "inputs")
        if shape is not None:
            if self.channel_axis >= len(shape):
                raise ProtocolError(f"{where}: channel_axis {self.channel_axis} for a first input of shape {shape}")
            dim = shape[self.channel_axis]
            if _int(dim) and dim != self.channels:
                raise ProtocolError(f"{where}: {self.channels} channel(s) for a first input of shape {shape} "
                                    f"(axis {self.channel_axis} has {dim})")
        shape = _first_shape(io, "outputs")
        if self.classes is not None and shape is not None and len(shape) >= 2 and all(_int(d) for d in shape[1:]):
            width = math.prod(shape[1:])
            if width != len(self.classes):
                raise ProtocolError(f"{where}: {len(self.classes)} classes for a first output of shape {shape} "
                                    f"({width} scores a row)")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys(obj: Any, part: str, where: str) -> None:
    what = f"{where}.{part}" if part else where
    known = _KEYS[part]
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a mapping of {', '.join(known)}, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise ProtocolError(f"{what}: unknown key {short(unknown[0], 60)}; known: {', '.join(known)}")


def _numbers(value: Any, what: str, least: int, most: int) -> tuple[float, ...]:
    if not isinstance(value, list) or not least <= len(value) <= most:
        raise ProtocolError(f"{what}: expected a list of {least} to {most} numbers, got {short(value, 60)}")
    for i, v in enumerate(value):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or abs(v) >= 1e30:
            raise ProtocolError(f"{what}[{i}]: expected a finite number, got {short(v, 60)}")
    return tuple(float(v) for v in value)


def _shares(value: Any, what: str, most: int) -> tuple[float, ...]:
    shares = _numbers(value, what, 2, most)
    if any(not 0 <= s <= 1 for s in shares):
        raise ProtocolError(f"{what}: every share must be in [0, 1], got {short(list(shares), 60)}")
    if abs(math.fsum(shares) - 1) > SUM_TOLERANCE:
        raise ProtocolError(f"{what}: shares must sum to 1 (within {SUM_TOLERANCE}), got {math.fsum(shares):.6g}")
    return shares


def _first_shape(io: Any, key: str) -> list | None:
    specs = io.get(key) if isinstance(io, dict) else None
    first = specs[0] if isinstance(specs, list) and specs else None
    shape = first.get("shape") if isinstance(first, dict) else None
    return shape if isinstance(shape, list) else None


# --------------------------------------------------------------------------- one batch's summary (both ends)

def channel_sums(x: Any, axis: int, channels: int) -> tuple[np.ndarray, int] | None:
    """Per-channel sums of ``x`` along ``axis`` (``channels`` of them) and how many values each summed; None when
    ``x`` is not a finite numeric array with ``channels`` entries on ``axis``. Plain numpy reductions over
    contiguous memory, no BLAS (whose thread pool would contend with the runtime's): about 25 us on a
    1x3x224x224 float32 input, 19 us on 1x224x224x3, most of what observing a request costs."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf" or x.ndim <= axis or x.shape[axis] != channels \
            or x.size == 0:
        return None
    if x.dtype != np.float32 and x.dtype != np.float64:
        x = x.astype(np.float32)
    x = np.ascontiguousarray(x)
    pre = math.prod(x.shape[:axis])
    post = x.size // (pre * channels)
    if post == 1:  # channels last: rows of (the axis before the channels x channels), summed row-wise, then folded
        inner = x.shape[axis - 1]
        sums = x.reshape(pre // inner, inner * channels).sum(axis=0).reshape(inner, channels).sum(axis=0)
    else:
        sums = x.reshape(pre * channels, post).sum(axis=1).reshape(pre, channels).sum(axis=0)
    return (sums, pre * post) if math.isfinite(sums.sum()) else None  # a NaN or infinity anywhere reaches the sum


def class_rows(out: Any, classes: int | None = None) -> np.ndarray | None:
    """The first output as one row of scores per sample (``samples x classes``, float), or None when it is not
    one score per class: a row 2..MAX_CLASSES wide (``classes`` wide when given) with at most one axis > 1."""
    if not isinstance(out, np.ndarray) or out.dtype.kind not in "biuf" or out.size == 0:
        return None
    shape = out.shape if out.ndim > 1 else (1, *out.shape)
    if sum(d > 1 for d in shape[1:]) > 1:
        return None
    rows = out.reshape(shape[0], -1)
    width = rows.shape[1]
    if not 2 <= width <= MAX_CLASSES or (classes is not None and width != classes):
        return None
    return rows if rows.dtype in (np.float32, np.float64) else rows.astype(np.float32)


def top1_classes(out: Any) -> np.ndarray | None:
    """Each row's top-1 class when ``out`` is one score per class (:func:`class_rows`), else None."""
    rows = class_rows(out)
    return None if rows is None else rows.argmax(axis=1)


def top1(rows: np.ndarray, scores: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's top-1 class and its confidence in [0, 1] (the softmax of logits, or the probability itself);
    None when a row is not finite."""
    idx = rows.argmax(axis=1)
    top = rows[np.arange(len(rows)), idx]
    if scores == "logits":
        conf = 1.0 / np.exp(rows - top[:, None]).sum(axis=1)  # in (0, 1]: the top term is exp(0)
    else:
        conf = np.minimum(np.maximum(top, 0.0), 1.0)
    return (idx, conf) if math.isfinite(conf.sum()) else None


def confidence_bins(conf: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each confidence among ``bins`` equal bins on [0, 1] (1.0 falls in the last)."""
    return np.minimum((conf * bins).astype(np.intp), bins - 1)


def looks_like_probabilities(rows: np.ndarray) -> bool:
    """Every value in [0, 1] and every row summing to 1: the model ends in a softmax."""
    return bool(rows.min() >= -1e-6 and rows.max() <= 1 + 1e-6
                and np.all(np.abs(rows.sum(axis=1, dtype=np.float64) - 1) <= SUM_TOLERANCE))


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of shares ``actual`` against ``expected``, each floored at EPS."""
    a, e = np.maximum(actual, EPS), np.maximum(expected, EPS)
    return float(np.sum((a - e) * np.log(a / e)))


# --------------------------------------------------------------------------- the device's side: watching live traffic

@dataclass(frozen=True)
class DriftScores:
    """What a monitor's window says; the scores are None while the window has nothing they need."""

    window: int  # requests the window holds at most
    requests: int  # requests in the window now
    samples: int  # samples (rows of a batch) in the window now
    skipped: int  # requests observe() could not read, since the monitor started
    psi_outputs: float | None = None
    psi_confidence: float | None = None
    mean_shift: tuple[float, ...] | None = None
    max_mean_shift: float | None = None

    @classmethod
    def from_dict(cls, obj: Any, where: str = "metrics: drift") -> "DriftScores":
        """The host's parse of :meth:`to_dict` (a ``version`` key beside it is allowed and left to the caller).
        Total: any value gives DriftScores or ProtocolError naming the field."""
        known = ("version", "window", "requests", "samples", "skipped", "psi_outputs", "psi_confidence",
                 "mean_shift", "max_mean_shift")
        if not isinstance(obj, dict):
            raise ProtocolError(f"{where}: expected an object, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in known]
        if unknown:
            raise ProtocolError(f"{where}: unknown key {short(unknown[0], 40)}; known: {', '.join(known)}")
        counts = {}
        for key in ("window", "requests", "samples", "skipped"):
            v = obj.get(key)
            if not _int(v) or not 0 <= v < 2**53:
                raise ProtocolError(f"{where}.{key}: expected a count, got {short(v, 40)}")
            counts[key] = v

        def score(key: str, v: Any) -> float | None:
            if v is None:
                return None
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v < 1e12:
                raise ProtocolError(f"{where}.{key}: expected a score >= 0, got {short(v, 40)}")
            return float(v)

        shift = obj.get("mean_shift")
        if shift is not None and (not isinstance(shift, list) or not 0 < len(shift) <= MAX_CHANNELS):
            raise ProtocolError(f"{where}.mean_shift: expected a list of 1 to {MAX_CHANNELS} scores")
        return cls(**counts, psi_outputs=score("psi_outputs", obj.get("psi_outputs")),
                   psi_confidence=score("psi_confidence", obj.get("psi_confidence")),
                   mean_shift=None if shift is None else tuple(_required(score("mean_shift", v), where)
                                                                for v in shift),
                   max_mean_shift=score("max_mean_shift", obj.get("max_mean_shift")))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values for a metrics message (six significant digits)."""
        # six significant digits; a score JSON cannot carry, or past what the host takes, is sent as unknown
        r = lambda v: None if v is None or not math.isfinite(v) or abs(v) >= 1e12 else float(f"{v:.6g}")  # noqa: E731
        return {"window": self.window, "requests": self.requests, "samples": self.samples, "skipped": self.skipped,
                "psi_outputs": r(self.psi_outputs), "psi_confidence": r(self.psi_confidence),
                "mean_shift": None if self.mean_shift is None or any(r(v) is None for v in self.mean_shift)
                else [r(v) for v in self.mean_shift],
                "max_mean_shift": r(self.max_mean_shift)}


def _required(v: float | None, where: str) -> float:
    if v is None:
        raise ProtocolError(f"{where}.mean_shift: a channel without a score")
    return v


class DriftMonitor:
    """Windowed statistics of live requests against a Reference, cheap enough for every request.

    The window is ``SLOTS`` (8) slots of ``ceil(window / 8)`` requests each: a request is added to the newest
    slot; when that is full the oldest slot is cleared and becomes the newest. Scores sum every slot, so they
    cover the last ``window`` requests to within one slot (between 7/8 of ``window`` and ``window``).

    Memory, whatever the traffic: 8 x (channels + classes + bins + 4) numbers of 8 bytes (3 channels, 1000
    classes and 10 bins: 65 KB; :meth:`state_bytes` says it exactly). ``observe`` summarises a request outside
    the lock (one pass of sums over the input, an argmax and a softmax over the output) and holds the
    lock only to add a few dozen numbers; it never raises: an array it cannot read (another shape, a dtype that
    is not numeric, NaN or infinity) is counted in ``skipped`` and left out."""

    def __init__(self, reference: Reference, window: int = 1000) -> None:
        if not _int(window) or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window: expected an integer in [1, {MAX_WINDOW}], got {window!r}")
        self.reference, self.window = reference, window
        self.per_slot = -(-window // SLOTS)
        c = reference.channels
        k, b = len(reference.classes or ()), len(reference.confidence or ())
        self._mean, self._std = np.asarray(reference.mean), np.asarray(reference.std)
        self._classes_ref = np.asarray(reference.classes or (), dtype=np.float64)
        self._conf_ref = np.asarray(reference.confidence or (), dtype=np.float64)
        self._sums = np.zeros((SLOTS, c))  # per channel, of the input's values
        self._counts = np.zeros((SLOTS, 4))  # values per channel, samples, requests, output rows
        self._classes = np.zeros((SLOTS, k))
        self._conf = np.zeros((SLOTS, b))
        self._slot, self.skipped = 0, 0
        self._lock = threading.Lock()

    def observe(self, inputs: Any, outputs: Any) -> bool:
        """Add one request: its first input (as the model was fed: after preprocessing) and its first output (an
        array, or the list a session's run returns). False when it could not be read (counted in ``skipped``)."""
        try:
            with np.errstate(all="ignore"):  # NaN or overflow is found in the sums, not warned about per request
                summary = self._summarise(inputs, outputs)
        except Exception:  # noqa: BLE001 - a request the monitor cannot read is counted, never raised
            summary = None
        with self._lock:
            if summary is None:
                self.skipped += 1
                return False
            sums, values, samples, top = summary
            s = self._slot
            if self._counts[s, 2] >= self.per_slot:
                s = self._slot = (s + 1) % SLOTS
                for table in (self._sums, self._counts, self._classes, self._conf):
                    table[s] = 0
            self._sums[s] += sums
            self._counts[s] += (values, samples, 1, 0 if top is None else len(top[0]))
            if top is not None:
                idx, bins = top
                if len(idx) == 1:
                    self._classes[s, idx[0]] += 1
                    self._conf[s, bins[0]] += 1
                else:
                    np.add.at(self._classes[s], idx, 1)
                    np.add.at(self._conf[s], bins, 1)
            return True

    def _summarise(self, inputs: Any, outputs: Any):
        ref = self.reference
        x = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
        got = channel_sums(x, ref.channel_axis, ref.channels)
        if got is None:
            return None
        top = None
        if ref.scores is not None:
            out = outputs[0] if isinstance(outputs, (list, tuple)) and outputs else outputs
            rows = class_rows(out, len(self._classes_ref))
            found = None if rows is None else top1(rows, ref.scores)
            if found is None:
                return None
            top = (found[0], confidence_bins(found[1], len(self._conf_ref)))
        return got[0], got[1], x.shape[0], top

    def scores(self) -> DriftScores:
        """The window's scores against the reference."""
        with self._lock:
            sums, counts = self._sums.sum(axis=0), self._counts.sum(axis=0)
            classes, conf, skipped = self._classes.sum(axis=0), self._conf.sum(axis=0), self.skipped
        values, samples, requests, rows = counts
        base = DriftScores(self.window, int(requests), int(samples), skipped)
        if not values:
            return base
        shift = np.abs(sums / values - self._mean) / self._std
        with_outputs = {}
        if rows and self.reference.scores is not None:
            with_outputs = {"psi_outputs": psi(classes / rows, self._classes_ref),
                            "psi_confidence": psi(conf / rows, self._conf_ref)}
        return DriftScores(self.window, int(requests), int(samples), skipped, mean_shift=tuple(map(float, shift)),
                           max_mean_shift=float(shift.max()), **with_outputs)

    def state_bytes(self) -> int:
        """The bytes the window holds: fixed when the monitor is made."""
        return sum(t.nbytes for t in (self._sums, self._counts, self._classes, self._conf))


# --------------------------------------------------------------------------- when a score is an event

@dataclass(frozen=True)
class Thresholds:
    """Scores above these raise events, once the window holds ``min_samples`` samples. PSI 0.25 is the
    conventional "significant shift" (0.1 "moderate"); a mean shift of 0.25 reference std is a quarter of the
    data's own spread (Cohen's "small" effect is 0.2), far above what the mean of a few hundred samples from
    the reference distribution wanders (a few hundredths)."""

    psi_outputs: float = 0.25
    psi_confidence: float = 0.25
    mean_shift: float = 0.25
    min_samples: int = 200

    @classmethod
    def from_dict(cls, obj: Any, where: str = "drift") -> "Thresholds":
        """Total: any value gives Thresholds (absent keys keep their defaults) or ProtocolError naming the field."""
        known = ("psi_outputs", "psi_confidence", "mean_shift", "min_samples")
        if not isinstance(obj, dict):
            raise ProtocolError(f"{where}: expected a mapping of {', '.join(known)}, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in known]
        if unknown:
            raise ProtocolError(f"{where}: unknown key {short(unknown[0], 60)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key in known[:3]:
            if key in obj:
                v = obj[key]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e6:
                    raise ProtocolError(f"{where}.{key}: expected a number in (0, 1e6), got {short(v, 60)}")
                values[key] = float(v)
        if "min_samples" in obj:
            v = obj["min_samples"]
            if not _int(v) or not 1 <= v <= MAX_WINDOW:
                raise ProtocolError(f"{where}.min_samples: expected an integer in [1, {MAX_WINDOW}], "
                                    f"got {short(v, 60)}")
            values["min_samples"] = v
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"psi_outputs": self.psi_outputs, "psi_confidence": self.psi_confidence,
                "mean_shift": self.mean_shift, "min_samples": self.min_samples}


def events(scores: DriftScores, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The scores above their thresholds, ``[{score, value, threshold}]`` (``channel`` too for a mean shift);
    none while the window holds fewer than ``min_samples`` samples."""
    if scores.samples < thresholds.min_samples:
        return []
    out = []
    for name, value, limit in (("psi_outputs", scores.psi_outputs, thresholds.psi_outputs),
                               ("psi_confidence", scores.psi_confidence, thresholds.psi_confidence),
                               ("mean_shift", scores.max_mean_shift, thresholds.mean_shift)):
        if value is not None and value > limit:
            event: dict[str, Any] = {"score": name, "value": float(f"{value:.6g}"), "threshold": limit}
            if name == "mean_shift" and scores.mean_shift is not None:
                event["channel"] = int(np.argmax(scores.mean_shift))
            out.append(event)
    return out


__all__ = ["CONFIDENCE_BINS", "EPS", "MAX_BINS", "MAX_CHANNELS", "MAX_CLASSES", "SCORES", "DriftMonitor",
           "DriftScores", "Reference", "Thresholds", "channel_sums", "class_rows", "confidence_bins", "events",
           "looks_like_probabilities", "psi", "top1", "top1_classes"]
