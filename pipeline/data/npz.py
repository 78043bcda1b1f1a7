"""``data: {name: npz, path: F}``: the user's x_train, y_train, x_test, y_test, opened memory-mapped.

An .npz is a zip of .npy files. ``numpy.savez`` stores them uncompressed (ZIP_STORED): each is then mapped at
its data offset (the zip's local header, then the .npy header read with ``numpy.lib.format``), so a split larger
than memory costs only the pages touched. Compressed members (``savez_compressed``) are read into memory.

The images stay as they are when they are float32 and no preprocess is asked for; otherwise they are prepared
(converted, or the spec applied) chunk by chunk into the data cache. Every check reads a split at most once.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache
from .dataset import Dataset, Request, chunks, first_nonfinite, labels, prepare_nchw

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
WANTED = "expected x_train, y_train, x_test, y_test"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def _member(f, zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # deflated or encrypted: read it
        with zf.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    f.seek(info.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise ValueError(f"member {info.filename}: no local file header at offset {info.header_offset}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # a newer header: read it the ordinary way
        with zf.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    if dtype.hasobject:
        raise ValueError(f"member {info.filename}: holds Python objects (dtype {dtype}); expected numbers")
    offset = f.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + size > start + info.file_size:
        raise ValueError(f"member {info.filename}: {shape} {dtype} needs {size:,} bytes, the member has fewer")
    if size == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order="F" if fortran else "C")


def open_npz(path: Path) -> dict[str, np.ndarray]:
    """The file's arrays by name: uncompressed ones memory-mapped, compressed ones read."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        return {info.filename[:-4]: _member(f, zf, info, path) for info in zf.infolist()
                if info.filename.endswith(".npy") and info.filename[:-4] in ARRAYS}


def _split(arrays: dict[str, np.ndarray], split: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"data.path: {path}: x_{split} {x.shape} / y_{split} {y.shape}: expected N images "
                        "(N, C, H, W) and N integer labels")
    if x.dtype.kind not in "biuf":
        raise DataError(f"data.path: {path}: x_{split} has dtype {x.dtype}; expected numbers (N, C, H, W)")
    if len(x) == 0:
        raise DataError(f"data.path: {path}: cannot be read as a data set: x_{split} has no samples")
    return x, y


def load_npz(path: Path, request: Request = Request()) -> Dataset:
    """The file's split (cut to the sizes asked for), checked: numbers, integer labels, finite values."""
    path = Path(path)
    try:
        arrays = open_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error) as exc:
        raise DataError(f"data.path: {path}: cannot read as .npz ({exc})") from None
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"data.path: {path}: missing an array ({missing[0]}); {WANTED}")
    split, problems = {}, []
    for name, size in (("train", request.train_size), ("test", request.test_size)):
        x, y = _split(arrays, name, path)
        y, wrong = labels(np.asarray(y[:size]), f"y_{name}")
        split[name], problems = (x[:size], y), problems + wrong
    if problems:
        raise DataError(f"data.path: {path}: {'; '.join(problems)}")
    spec = request.spec()
    xs, bad = _prepared(path, request, split["train"][0], split["test"][0])
    problems = [f"x_{name} has NaN or infinite values (sample {bad[name]})" for name in ("train", "test")
                if bad[name] >= 0]
    if problems:
        raise DataError(f"data.path: {path}: {'; '.join(problems)}")
    (y_train, y_test) = split["train"][1], split["test"][1]
    classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(str(path), xs["train"], y_train, xs["test"], y_test, classes, preprocess=spec)


def _prepared(path: Path, request: Request, x_train: np.ndarray,
              x_test: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The images as float32 (the file's own when they are, else prepared into the cache), and for each split
    its first sample with a NaN or infinity (-1: none)."""
    spec, raw = request.spec(), {"train": x_train, "test": x_test}
    if spec is None and all(x.dtype == np.float32 for x in raw.values()):
        return {k: np.asarray(x) for k, x in raw.items()}, {k: first_nonfinite(x) for k, x in raw.items()}
    stat = path.stat()
    key = cache.cache_key({"source": "npz", "path": str(path.resolve()), "size": stat.st_size,
                           "mtime_ns": stat.st_mtime_ns, "spec": spec.to_dict() if spec else None,
                           "train_size": request.train_size, "test_size": request.test_size})

    def fill(allocate: cache.Allocate) -> dict:
        bad = {}
        for name, x in raw.items():
            if spec is None:  # another dtype: converted, chunk by chunk
                out = allocate(f"x_{name}", x.shape, np.float32)
                for part in chunks(len(x), int(np.prod(x.shape[1:], dtype=np.int64)) * 8):
                    out[part] = x[part]
                bad[name] = first_nonfinite(out)
            else:
                _, bad[name] = prepare_nchw(x, spec, lambda shape, n=name: allocate(f"x_{n}", shape, np.float32))
        return {"nonfinite": bad}

    arrays, meta, _ = cache.prepared(request.cache_dir, key, f"npz:{path.resolve()}", fill)
    return {k: arrays[f"x_{k}"] for k in raw}, meta["nonfinite"]
