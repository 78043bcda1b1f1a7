"""``data: {name: folder, path: DIR}``: labelled images, one folder per class, decoded by Pillow.

``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` keep their split; ``DIR/<class>/*`` is split here (``seed``,
``test_size`` images or ``test_fraction``, default 20%). Class names sorted give the label indices. Files ending
.png, .jpg or .jpeg are read (others and hidden files ignored); each is decoded as RGB (``channels: 3``) or
grayscale (``channels: 1``, Pillow "L"), as stored (no EXIF rotation), and prepared by the preprocess spec
(``scale`` 1/255 unless it says otherwise). The prepared splits are kept in the data cache and opened
memory-mapped, so a folder is decoded once and never held in memory whole.

Every problem is a DataError naming the folder and the file: an image that cannot be decoded, an empty class
folder, images of different sizes without a resize, a folder with no classes; all of them at once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.preprocess import Preprocess, PreprocessError

from ..errors import DataError
from . import cache
from .dataset import Dataset, Request

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = {1: "L", 3: "RGB"}
#: problems shown in the one error; the rest are counted
SHOWN = 8
DEFAULT_TEST_FRACTION = 0.2
#: 8-bit pixels to [0, 1] unless data.preprocess.scale says otherwise
DEFAULT_SCALE = 1 / 255


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def _visible(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not p.name.startswith("."))


def _classes(d: Path, root: Path) -> dict[str, list[Path]]:
    """``d``'s class folders and their images; an empty class folder or a folder without any is an error."""
    where = f"data.path: {root}"
    dirs = [p for p in _visible(d) if p.is_dir()]
    if not dirs:
        rel = "" if d == root else f" {d.relative_to(root)}/"
        raise DataError(f"{where}:{rel} has no class folders; expected one folder of .png/.jpg images per class "
                        f"({'DIR/<class>/*, or ' if d == root else ''}DIR/train/<class>/* and DIR/test/<class>/*)")
    found = {p.name: [f for f in _visible(p) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()] for p in dirs}
    empty = [str(d.relative_to(root) / name) for name, files in found.items() if not files]
    if empty:
        raise DataError(f"{where}: class folder(s) without .png/.jpg images: {', '.join(empty[:SHOWN])}"
                        + (f" and {len(empty) - SHOWN} more" if len(empty) > SHOWN else "")
                        + "; remove them or add images")
    return found


def scan(root: Path, request: Request) -> tuple[list[str], dict[str, list[Sample]]]:
    """The class names and each split's samples, shuffled by ``seed`` and cut to the sizes asked for."""
    if not root.is_dir():
        raise DataError(f"data.path: {root}: not a directory; data.name folder reads DIR/<class>/*.png|jpg "
                        "(or DIR/train/<class>/* and DIR/test/<class>/*)")
    rng = np.random.default_rng(request.seed)
    has = {s: (root / s).is_dir() for s in ("train", "test")}
    if has["train"] != has["test"]:
        one, other = ("train", "test") if has["train"] else ("test", "train")
        raise DataError(f"data.path: {root}: has {one}/ but no {other}/; give both (each with one folder per "
                        "class), or put the class folders directly in the folder to have it split")
    if has["train"]:
        train, test = _classes(root / "train", root), _classes(root / "test", root)
        classes = sorted(train)
        extra = sorted(set(test) - set(train))
        if extra:
            raise DataError(f"data.path: {root}: test/ has classes train/ lacks: {', '.join(extra[:SHOWN])}; "
                            f"train/ has {', '.join(classes[:SHOWN])}")
        splits = {}
        for name, found, size in (("train", train, request.train_size), ("test", test, request.test_size)):
            samples = [Sample(f, classes.index(c)) for c in sorted(found) for f in found[c]]
            if size is not None and size > len(samples):
                raise DataError(f"data.{name}_size {size}: {root / name} has {len(samples)} images")
            splits[name] = [samples[i] for i in rng.permutation(len(samples))[:size]]
        return classes, splits
    found = _classes(root, root)
    classes = sorted(found)
    samples = [Sample(f, classes.index(c)) for c in classes for f in found[c]]
    n = len(samples)
    test_n = request.test_size or max(1, round(n * (request.test_fraction or DEFAULT_TEST_FRACTION)))
    train_n = request.train_size or n - test_n
    if n < 2 or train_n < 1 or train_n + test_n > n:
        raise DataError(f"data.path: {root}: {n} image(s); train_size {train_n} + test_size {test_n} exceed them "
                        "(or leave no training images)")
    order = rng.permutation(n)
    return classes, {"test": [samples[i] for i in order[:test_n]],
                     "train": [samples[i] for i in order[test_n:test_n + train_n]]}


def decode(path: Path, channels: int) -> np.ndarray:
    """The image as H x W x C uint8 (RGB, or L for one channel), as Pillow decodes it."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert(MODES[channels])).reshape(im.height, im.width, channels)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_folder(root: Path, request: Request = Request()) -> Dataset:
    root = Path(root)
    classes, splits = scan(root, request)
    spec = request.spec(Preprocess())
    spec = dataclasses.replace(spec, channels=spec.channels or 3, scale=DEFAULT_SCALE if spec.scale is None
                               else spec.scale)
    files = {name: [(str(s.path.relative_to(root)), *_stat(s.path)) for s in samples]
             for name, samples in splits.items()}
    key = cache.cache_key({"source": "folder", "path": str(root.resolve()), "files": files,
                           "labels": {n: [s.label for s in ss] for n, ss in splits.items()}, "classes": classes,
                           "spec": spec.to_dict()})

    def fill(allocate: cache.Allocate) -> dict:
        log.info("data: decoding %d images of %s (%s), prepared into the data cache",
                 sum(map(len, splits.values())), root, spec.to_dict())
        return _decode_all(root, splits, spec, allocate)

    try:
        arrays, meta, hit = cache.prepared(request.cache_dir, key, f"folder:{root.resolve()}", fill)
    except ImportError as exc:  # Pillow is a host dependency; say so rather than fail deep inside
        raise DataError(f"data.name folder needs Pillow to decode images ({exc}); pip install pillow") from None
    if hit:
        log.info("data: %s prepared before (cache %s)", root, key[:12])
    return Dataset(str(root), arrays["x_train"], np.asarray(arrays["y_train"]), arrays["x_test"],
                   np.asarray(arrays["y_test"]), len(classes), preprocess=spec, classes=tuple(classes))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _decode_all(root: Path, splits: dict[str, list[Sample]], spec: Preprocess, allocate: cache.Allocate) -> dict:
    """Decode and prepare every image into the arrays ``allocate`` gives; all problems in one DataError."""
    problems: list[str] = []
    shape, first = None, None
    for name, samples in splits.items():
        out = None
        for i, s in enumerate(samples):
            rel = s.path.relative_to(root)
            try:
                image = decode(s.path, spec.channels)
            except ImportError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the file holds: it is not an image we can read
                problems.append(f"{rel}: cannot be decoded as an image ({_first_line(exc)})")
                continue
            try:
                got = spec.output_shape(*image.shape)
            except PreprocessError as exc:
                problems.append(f"{rel}: {exc}")
                continue
            if shape is None:
                shape, first = got, (rel, image.shape)
            elif got != shape:
                problems.append(_mismatch(spec, rel, image.shape, first))
                continue
            if out is None:
                out = allocate(f"x_{name}", (len(samples), *shape), np.float32)
            out[i] = spec.apply(image)
            if not np.isfinite(out[i]).all():
                problems.append(f"{rel}: NaN or infinite values once prepared ({spec.to_dict()})")
        allocate(f"y_{name}", (len(samples),), np.int64)[:] = [s.label for s in samples]
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"data.path: {root}: {len(problems)} image(s) cannot be used:\n  "
                        + "\n  ".join(problems[:SHOWN]) + more)
    return {"shape": list(shape)}


def _mismatch(spec: Preprocess, rel: Path, got: tuple, first: tuple) -> str:
    size = f"{rel}: {got[0]}x{got[1]}, but {first[0]} is {first[1][0]}x{first[1][1]}"
    if spec.resize is None and spec.crop is None:
        return f"{size}: images of different sizes need data.preprocess.resize: [H, W] (or resize: N and crop: [H, W])"
    return (f"{size}: their shapes differ once prepared (resize {spec.resize} keeps the aspect ratio); add "
            "data.preprocess.crop: [H, W], or resize: [H, W]")
