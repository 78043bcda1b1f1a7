"""Prepared splits kept on disk as .npy files and opened memory-mapped, so that a large data set is decoded and
preprocessed once and never held in memory whole.

An entry is ``WORKDIR/data/<key>/`` with one ``.npy`` per array and ``meta.json``; the key is a hash of what the
arrays were made from (the source files' paths, sizes and modification times, the preprocess spec, the split),
so a changed file or spec is a miss. An entry is written under a temporary name and renamed into place (a reader
sees all of it or none); writing one removes the older entries of the same source. Arrays open copy-on-write
(``mmap_mode="c"``): writable for torch, the file never changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
#: allocate(name, shape, dtype) -> a writable array that becomes the entry's ``name``
Allocate = Callable[[str, tuple[int, ...], Any], np.ndarray]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode()) \
        .hexdigest()


def _open(entry: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return None
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="c", allow_pickle=False) for name in meta["arrays"]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged entry is a miss, made again
        log.warning("data cache entry %s unreadable (%s): preparing the data again", entry, exc)
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)
    return arrays, meta


def prepared(root: Path | None, key: str, source: str,
             fill: Callable[[Allocate], dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, Any], bool]:
    """The arrays of entry ``key`` and its metadata, and whether they were already there. On a miss ``fill``
    allocates and fills the arrays and returns metadata (JSON); with ``root`` None they stay in memory."""
    if root is None:
        arrays: dict[str, np.ndarray] = {}

        def in_memory(name, shape, dtype):
            arrays[name] = np.empty(shape, dtype)
            return arrays[name]

        return arrays, fill(in_memory), False
    entry = root / key
    hit = _open(entry, key)
    if hit is not None:
        return (*hit, True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: dict[str, np.memmap] = {}

    def on_disk(name, shape, dtype):
        written[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        return written[name]

    try:
        meta = {**fill(on_disk), "format": CACHE_FORMAT, "key": key, "source": source, "arrays": list(written)}
        for array in written.values():
            array.flush()
        written.clear()
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _forget_older(root, key, source)
    hit = _open(entry, key)
    if hit is None:
        raise OSError(f"{entry}: written but cannot be read back")
    return (*hit, False)


def _forget_older(root: Path, key: str, source: str) -> None:
    """Entries of the same source made from other files or another spec: superseded."""
    for other in root.iterdir():
        if other.name == key or other.name.startswith("."):
            continue
        try:
            if json.loads((other / "meta.json").read_text()).get("source") == source:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError, AttributeError):
            continue
