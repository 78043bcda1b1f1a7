"""The data deploy.yaml's ``data:`` names: a set that ships inside a package (``builtin``), or the user's own,
read from ``data.path``: a ``.npz`` file (``npz``, memory-mapped) or a folder of labelled images (``folder``).

Every source gives a :class:`Dataset` whose images are prepared by one preprocess spec
(:mod:`device_agent.preprocess`), the same the device is told in the signed manifest. Large prepared splits
live in the data cache (``cache``) and are opened memory-mapped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from device_agent.preprocess import PreprocessError

from ..errors import DataError
from ..registry import Registry, UnknownNameError
from .builtin import DATASETS
from .dataset import Dataset, Request
from .folder import load_folder
from .npz import load_npz

#: the data sets read from data.path, keyed by data.name
SOURCES: Registry[Callable[[Path, Request], Dataset]] = Registry("data source")
SOURCES.register("npz")(load_npz)
SOURCES.register("folder")(load_folder)
#: what data.path must be for each of them, in the order the docs give them
PATH_SOURCES = {"npz": "a .npz file with x_train, y_train, x_test, y_test",
                "folder": "a directory with one folder of .png/.jpg images per class (or train/ and test/ with them)"}


def load_dataset(name: str, train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 path=None, **options) -> Dataset:
    """Shuffle with ``seed`` and split; by default 80% train / 20% test. ``npz`` keeps the file's split, ``folder``
    its train/ and test/ when it has them. ``options``: the rest of :class:`Request` (preprocess, channels,
    test_fraction, cache_dir)."""
    request = Request(train_size, test_size, seed, **options)
    if name in SOURCES:
        if path is None:
            raise DataError(f"data.name {name} needs data.path: {PATH_SOURCES[name]}")
        return SOURCES.get(name)(Path(path), request)
    try:
        x, y, classes = DATASETS.get(name)()
    except UnknownNameError as exc:
        raise DataError(f"data.name: {exc}, {', '.join(PATH_SOURCES)}") from None
    n = len(x)
    test_size = test_size or (max(1, round(n * request.test_fraction)) if request.test_fraction else n // 5)
    train_size = train_size or n - test_size
    if train_size + test_size > n:
        raise DataError(f"dataset {name!r} has {n} samples; train_size {train_size} + test_size {test_size} exceed it")
    order = np.random.default_rng(seed).permutation(n)
    tr, te = order[:train_size], order[train_size:train_size + test_size]
    spec = request.spec()
    if spec is None:
        return Dataset(name, x[tr], y[tr], x[te], y[te], classes)
    try:  # small and in memory: prepared as the device will prepare its images (e.g. gray repeated to RGB)
        prepared = [spec.apply_batch(part.transpose(0, 2, 3, 1)) for part in (x[tr], x[te])]
    except PreprocessError as exc:
        raise DataError(f"data.preprocess: {exc} (data.name {name!r}: {x.shape[2]}x{x.shape[3]}, "
                        f"{x.shape[1]} channel(s))") from None
    return Dataset(name, prepared[0], y[tr], prepared[1], y[te], classes, preprocess=spec)


__all__ = ["DATASETS", "PATH_SOURCES", "SOURCES", "Dataset", "Request", "load_dataset", "load_folder", "load_npz"]
