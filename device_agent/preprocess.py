"""How a model's inputs are prepared from an image: one spec, one numpy implementation, both ends of the wire.

The host applies :meth:`Preprocess.apply` to training, calibration and evaluation data and to the golden
vectors; the signed manifest carries the spec (``preprocess``) so that the application on the device prepares
its camera frames or files the same way (and may call this very function: numpy is all it needs).

The steps, in order, each optional:

1. ``channels``: 1 (grayscale) or 3 (RGB). A decoder gives them directly (Pillow ``convert("L")`` /
   ``convert("RGB")``); an array with the other count is converted here (gray repeated three times, or
   ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B``, Pillow's weights).
2. ``resize``: an integer N scales the shorter side to N and the longer to ``int(N * long / short)``
   (torchvision's rule); ``[H, W]`` resizes to exactly that. Bilinear with half-pixel centres and edge
   clamping, no antialiasing: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` and
   OpenCV's ``INTER_LINEAR`` on float input compute the same.
3. ``crop``: ``[H, W]`` (or N for N x N) from the centre; the top-left corner is ``round((h - H) / 2)``,
   ``round((w - W) / 2)``. An image smaller than the crop is refused.
4. ``channel_order``: ``RGB`` (as decoded) or ``BGR`` (channels reversed).
5. ``scale``: every value multiplied by it (``1/255`` maps 8-bit pixels to [0, 1]; a string ``"1/255"``
   is accepted and stored as the number). Absent: 1 (the host's image folders make it 1/255 and say so).
6. ``mean`` / ``std``: per channel of the result (one value, or one per channel), ``(x - mean) / std``.
7. ``layout``: ``NCHW`` (channels first) or ``NHWC``; ``dtype``: ``float32``.

Arithmetic is float64 until the final cast, so the result does not depend on the input's dtype.
:meth:`Preprocess.from_dict` is total: any value gives a spec or :class:`PreprocessError` (a ProtocolError).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError
from .protocol import short

#: the largest side a resize or crop may ask for
MAX_SIDE = 16384
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
DTYPES = ("float32",)
CHANNELS = (1, 3)
#: Pillow's "L" conversion (ITU-R 601-2 luma)
LUMA = (0.299, 0.587, 0.114)
KEYS = ("channels", "resize", "crop", "channel_order", "scale", "mean", "std", "layout", "dtype")
_RATIO = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*/\s*([0-9]+(?:\.[0-9]*)?)\s*$")


class PreprocessError(ProtocolError):
    """A preprocess spec is malformed, or an image does not fit it (smaller than the crop, other channels)."""


@dataclass(frozen=True)
class Preprocess:
    """A typed preprocess spec; the default is the identity on an H x W x C image, returned as C x H x W."""

    channels: int | None = None  # 1 or 3; None: as the input has them
    resize: int | tuple[int, int] | None = None  # shorter side to N, or (H, W)
    crop: tuple[int, int] | None = None  # centre crop (H, W)
    channel_order: str = "RGB"
    scale: float | None = None  # None: not given (1; an image folder's default is 1/255)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"
    dtype: str = "float32"

    # ------------------------------------------------------------------ parse and build

    @classmethod
    def from_dict(cls, obj: Any, what: str = "preprocess") -> "Preprocess":
        """The typed spec of ``obj``. Total: any value gives a Preprocess or PreprocessError naming the field."""
        if not isinstance(obj, dict):
            raise PreprocessError(f"{what}: expected a mapping of {', '.join(KEYS)}, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in KEYS]
        if unknown:
            raise PreprocessError(f"{what}: unknown key {short(unknown[0], 60)}; known: {', '.join(KEYS)}")
        channels = _choice(obj, "channels", CHANNELS, what, optional=True)
        resize = obj.get("resize")
        if resize is not None:
            resize = _pair(resize, f"{what}.resize") if isinstance(resize, list) else _side(resize, f"{what}.resize")
        crop = obj.get("crop")
        if crop is not None:
            crop = _pair(crop, f"{what}.crop") if isinstance(crop, list) else (_side(crop, f"{what}.crop"),) * 2
        mean, std = _values(obj.get("mean"), f"{what}.mean"), _values(obj.get("std"), f"{what}.std")
        if std is not None and any(s <= 0 for s in std):
            raise PreprocessError(f"{what}.std: every value must be > 0, got {list(std)}")
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, 3):
                raise PreprocessError(f"{what}.{name}: one value, or one per channel (3), got {len(values)}")
            if values is not None and channels is not None and len(values) not in (1, channels):
                raise PreprocessError(f"{what}.{name}: {len(values)} values for {channels} channel(s)")
        order = _choice(obj, "channel_order", CHANNEL_ORDERS, what) if "channel_order" in obj else "RGB"
        if order == "BGR" and channels == 1:
            raise PreprocessError(f"{what}.channel_order: BGR needs 3 channels, channels is 1")
        return cls(channels=channels, resize=resize, crop=crop, channel_order=order,
                   scale=None if obj.get("scale") is None else _scale(obj["scale"], f"{what}.scale"),
                   mean=mean, std=std,
                   layout=_choice(obj, "layout", LAYOUTS, what) if "layout" in obj else "NCHW",
                   dtype=_choice(obj, "dtype", DTYPES, what) if "dtype" in obj else "float32")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, the inverse of ``from_dict`` (``Preprocess.from_dict(p.to_dict()) == p``)."""
        out: dict[str, Any] = {"channel_order": self.channel_order, "layout": self.layout, "dtype": self.dtype}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.channels is not None:
            out["channels"] = self.channels
        if self.resize is not None:
            out["resize"] = self.resize if isinstance(self.resize, int) else list(self.resize)
        if self.crop is not None:
            out["crop"] = list(self.crop)
        if self.mean is not None:
            out["mean"] = list(self.mean)
        if self.std is not None:
            out["std"] = list(self.std)
        return out

    # ------------------------------------------------------------------ the transform

    def output_shape(self, height: int, width: int, channels: int) -> tuple[int, int, int]:
        """The shape of one prepared sample (C, H, W or H, W, C as ``layout`` says) for an input image of
        ``height`` x ``width`` x ``channels``; PreprocessError when the image cannot be prepared."""
        if height < 1 or width < 1:
            raise PreprocessError(f"an image of {height}x{width} pixels: nothing to prepare")
        c = self.channels or channels
        if channels not in CHANNELS or c not in CHANNELS:
            raise PreprocessError(f"an image with {channels} channel(s): expected 1 (grayscale) or 3 (RGB)")
        h, w = self._resized(height, width)
        if self.crop is not None:
            if self.crop[0] > h or self.crop[1] > w:
                raise PreprocessError(f"an image of {h}x{w}{' after resize' if self.resize else ''} is smaller "
                                      f"than the crop {self.crop[0]}x{self.crop[1]}; resize it first (resize: N)")
            h, w = self.crop
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, c):
                raise PreprocessError(f"preprocess.{name} has {len(values)} values for images of {c} channel(s)")
        if self.channel_order == "BGR" and c != 3:
            raise PreprocessError("preprocess.channel_order BGR needs 3 channels; these images have 1")
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """One image, H x W or H x W x C (any real dtype), prepared: float32 in ``layout``."""
        image = np.asarray(image)
        return self.apply_batch(image[None] if image.ndim == 3 else image[None, :, :, None])[0]

    def apply_batch(self, images: np.ndarray) -> np.ndarray:
        """N images, N x H x W x C (any real dtype), prepared: N x output_shape, float32."""
        x = np.asarray(images)
        if x.ndim != 4 or x.dtype.kind not in "biuf":
            raise PreprocessError(f"expected N x H x W x C numbers, got shape {x.shape}, dtype {x.dtype}")
        n, height, width, channels = x.shape
        shape = self.output_shape(height, width, channels)
        x = x.astype(np.float64)
        if self.channels == 3 and channels == 1:
            x = np.repeat(x, 3, axis=3)
        elif self.channels == 1 and channels == 3:
            x = x @ np.asarray(LUMA)[:, None]
        if self.resize is not None:
            h, w = self._resized(height, width)
            x = _resize_axis(_resize_axis(x, 1, h), 2, w)
        if self.crop is not None:
            top, left = round((x.shape[1] - self.crop[0]) / 2), round((x.shape[2] - self.crop[1]) / 2)
            x = x[:, top:top + self.crop[0], left:left + self.crop[1]]
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            x = x - np.asarray(self.mean)
        if self.std is not None:
            x = x / np.asarray(self.std)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.dtype(self.dtype)).reshape(n, *shape)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is None:
            return height, width
        if not isinstance(self.resize, int):
            return self.resize
        if height <= width:
            return self.resize, max(1, int(self.resize * width / height))
        return max(1, int(self.resize * height / width)), self.resize


def _resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear interpolation along ``axis`` to ``size`` samples, half-pixel centres, edges clamped."""
    n = x.shape[axis]
    if n == size:
        return x
    src = np.clip((np.arange(size) + 0.5) * (n / size) - 0.5, 0, n - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    weight = (src - lo).reshape([size if a == axis else 1 for a in range(x.ndim)])
    a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return a + (b - a) * weight


# --------------------------------------------------------------------------- total field parsers

def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _side(value: Any, what: str) -> int:
    if not _int(value) or not 1 <= value <= MAX_SIDE:
        raise PreprocessError(f"{what}: expected an integer in [1, {MAX_SIDE}] or [height, width], "
                              f"got {short(value, 60)}")
    return value


def _pair(value: list, what: str) -> tuple[int, int]:
    if len(value) != 2 or not all(_int(v) and 1 <= v <= MAX_SIDE for v in value):
        raise PreprocessError(f"{what}: expected [height, width], integers in [1, {MAX_SIDE}], "
                              f"got {short(value, 60)}")
    return value[0], value[1]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and abs(value) < 1e30


def _values(value: Any, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not 1 <= len(values) <= 4 or not all(_number(v) for v in values):
        raise PreprocessError(f"{what}: expected a number or a list of one per channel, got {short(value, 60)}")
    return tuple(float(v) for v in values)


def _scale(value: Any, what: str) -> float:
    if isinstance(value, str) and (m := _RATIO.match(value[:40])) and float(m.group(2)) > 0:
        value = float(m.group(1)) / float(m.group(2))
    if not _number(value) or value == 0:
        raise PreprocessError(f"{what}: expected a non-zero number (e.g. 0.00392156862745098, or \"1/255\"), "
                              f"got {short(value, 60)}")
    return float(value)


def _choice(obj: dict, key: str, allowed: tuple, what: str, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise PreprocessError(f"{what}.{key}: expected one of {', '.join(map(str, allowed))}, got {short(value, 60)}")
    return value


__all__ = ["Preprocess", "PreprocessError"]
