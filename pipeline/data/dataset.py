"""What every data source gives (a Dataset) and what it is asked for (a Request), and the checks that a split is
usable, made in bounded chunks so that a memory-mapped split is read once, not held in memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.preprocess import Preprocess, PreprocessError

from ..errors import DataError

#: samples per chunk when a split is checked or prepared: bounded memory whatever the split's size
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, NCHW (NHWC when the preprocess spec says so); may be memory-mapped
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    preprocess: Preprocess | None = None  # how x was prepared from an image: signed into the manifest
    classes: tuple[str, ...] | None = None  # the label indices' names, where the source has them

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class Request:
    """What deploy.yaml's ``data:`` asks of a source besides its name and path."""

    train_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    test_fraction: float | None = None  # a folder without train/ and test/: the share held out
    preprocess: Preprocess | None = None
    channels: int | None = None  # 1 grayscale, 3 RGB; None: as the source has them
    cache_dir: Path | None = None  # where prepared splits are kept as .npy; None: prepared in memory

    def spec(self, default: Preprocess | None = None) -> Preprocess | None:
        """The spec to apply: deploy.yaml's (else ``default``), with ``channels`` folded in."""
        spec = self.preprocess or default
        if self.channels is None:
            return spec
        spec = spec or Preprocess()
        if spec.channels not in (None, self.channels):
            raise DataError(f"data.channels {self.channels} and data.preprocess.channels {spec.channels} disagree")
        return dataclasses.replace(spec, channels=self.channels)


def chunks(n: int, sample_bytes: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // max(1, sample_bytes))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def first_nonfinite(x: np.ndarray) -> int:
    """The index of the first sample with a NaN or infinity, or -1: one pass, in chunks."""
    if x.dtype.kind not in "fc":
        return -1
    sample = int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize
    for part in chunks(len(x), sample):
        bad = ~np.isfinite(x[part].reshape(part.stop - part.start, -1)).all(axis=1)
        if bad.any():
            return part.start + int(np.argmax(bad))
    return -1


def labels(y: np.ndarray, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer class indices (whole-number floats accepted), and what is wrong with them."""
    if y.dtype.kind not in "biuf":
        return y, [f"{what} has dtype {y.dtype}; expected integer class indices"]
    if y.dtype.kind == "f" and len(y) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        return y, [f"{what} has values that are not whole numbers; expected class indices 0..N-1"]
    y = np.asarray(y).astype(np.int64)
    return y, [f"{what} has negative labels (expected class indices 0..N-1)"] if len(y) and y.min() < 0 else []


def prepare_nchw(x: np.ndarray, spec: Preprocess,
                 allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """``spec`` applied to N images stored N x C x H x W (as a .npz holds them), chunk by chunk into an array
    from ``allocate(shape)`` (default: in memory); returns it and the first non-finite sample (or -1)."""
    n, c, h, w = x.shape
    try:
        shape = spec.output_shape(h, w, c)
    except PreprocessError as exc:
        raise DataError(f"data.preprocess: {exc}") from None
    out = (allocate or (lambda s: np.empty(s, np.float32)))((n, *shape))
    bad = -1
    for part in chunks(n, max(c * h * w, int(np.prod(shape))) * 8):
        prepared = spec.apply_batch(np.asarray(x[part]).transpose(0, 2, 3, 1))
        out[part] = prepared
        if bad < 0 and (i := first_nonfinite(prepared)) >= 0:
            bad = part.start + i
    return out, bad
