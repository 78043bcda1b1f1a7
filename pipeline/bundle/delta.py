"""Delta artifacts: the new model as a patch against the model a device runs (device_agent.delta's ``ops`` format).

Two ways to find the ops, both measured and the smaller kept:

- ``tensors`` (weight-aware): the byte range of every ONNX initializer's ``raw_data`` in both files (read from the
  protobuf wire format, :func:`onnx_tensors`). A tensor of the same name and size is copied when unchanged, else
  XORed against its old self (a fine-tune leaves the sign, the exponent and the high mantissa bits as they were:
  zeros) or inserted, planar by element width or not, whichever compresses smaller; everything else (the graph,
  tensors renamed or resized) goes through the byte matcher below.
- ``binary``: the byte matcher over the whole file, for any format (TFLite too): exact matches of 32 bytes or more
  anywhere in the base (a hash of every window, the base sampled every 8 bytes) become copies, extended both ways;
  between them, blocks that agree with the base on the neighbouring copies' alignment are XORed, the rest inserted.

Each patch is compressed with zlib and xz and the smaller kept; a delta is chosen only when it is at least
:data:`MIN_GAIN` smaller than the full payload, so it is never larger than the full artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.delta import BLOCK, COPY, CODEC_IDS, INSERT, MAX_OPS, XOR, Delta, Op, encode_ops, planar

from ..errors import ExportError
from . import Artifact, _sign, load_or_create, payload_name, write_artifact

log = logging.getLogger(__name__)

#: a delta must save this share of the full payload to be sent instead
MIN_GAIN = 0.01
#: the matcher's seed: bytes of an exact match, how often the base is sampled, the shortest copy kept
WINDOW, STEP, MIN_COPY = 32, 8, 64
#: blocks compared for XOR against the base, and the share of equal bytes that makes XOR pay
XOR_BLOCK, XOR_SHARE = 256, 0.2
#: ONNX TensorProto.DataType -> bytes per element
_WIDTHS = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_MULTS = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)]


@dataclass(frozen=True)
class Tensor:
    name: str
    start: int  # raw_data's byte range in the file
    end: int
    width: int  # bytes per element


@dataclass(frozen=True)
class DeltaChoice:
    """What was built for one base: each candidate's bytes (None: not applicable), the one chosen."""

    artifact: Artifact  # the delta artifact, or the full one when no delta pays
    base_version: int
    full_bytes: int
    candidates: dict[str, int | None]
    chosen: str  # "full", "tensors" or "binary"
    build_s: float

    @property
    def is_delta(self) -> bool:
        return self.chosen != "full"

    def to_dict(self) -> dict[str, Any]:
        return {"base_version": self.base_version, "full_bytes": self.full_bytes, "candidates": self.candidates,
                "chosen": self.chosen, "bytes": self.artifact.size_bytes,
                "ratio": round(self.full_bytes / self.artifact.size_bytes, 2), "build_s": round(self.build_s, 2)}


# --------------------------------------------------------------------------- ONNX initializers' byte ranges

def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return value, i
        if shift > 63:
            raise ValueError("varint too long")


def _fields(b: bytes, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    i = start
    while i < end:
        key, i = _varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(b, i)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(b, i)
            if i + n > end:
                raise ValueError("field past its message")
            yield number, wire, (i, i + n)
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("message overruns")


def _tensor(b: bytes, start: int, end: int) -> Tensor | None:
    name, raw, dtype = "", None, 0
    for number, wire, value in _fields(b, start, end):
        if number == 8 and wire == 2:
            name = b[value[0]:value[1]].decode(errors="replace")
        elif number == 9 and wire == 2:
            raw = value
        elif number == 2 and wire == 0:
            dtype = value
    return Tensor(name, raw[0], raw[1], _WIDTHS.get(dtype, 1)) if raw and raw[1] > raw[0] else None


def _graph(b: bytes, start: int, end: int, depth: int, out: list[Tensor]) -> None:
    """Initializers (GraphProto field 5), and the tensors and subgraphs of node attributes (NodeProto 5 ->
    AttributeProto t = 5, g = 6)."""
    for number, wire, value in _fields(b, start, end):
        if wire != 2:
            continue
        if number == 5 and (t := _tensor(b, *value)) is not None:
            out.append(t)
        elif number == 1:
            for n_number, n_wire, attr in _fields(b, *value):
                if n_number == 5 and n_wire == 2:
                    for a_number, a_wire, a_value in _fields(b, *attr):
                        if a_number == 5 and a_wire == 2 and (t := _tensor(b, *a_value)) is not None:
                            out.append(t)
                        elif a_number == 6 and a_wire == 2 and depth < 8:
                            _graph(b, *a_value, depth + 1, out)


def onnx_tensors(data: bytes) -> list[Tensor] | None:
    """The tensors whose raw bytes an ONNX file holds, in file order; None when ``data`` is not an ONNX model."""
    out: list[Tensor] = []
    try:
        for number, wire, value in _fields(data, 0, len(data)):
            if number == 7 and wire == 2:
                _graph(data, *value, 0, out)
    except (ValueError, IndexError):
        return None
    out.sort(key=lambda t: t.start)
    return out if out and all(a.end <= b.start for a, b in zip(out, out[1:])) else None


# --------------------------------------------------------------------------- the byte matcher

def _window_hashes(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each WINDOW-byte window of ``x``."""
    n = len(x) - WINDOW + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    words = np.zeros(len(x) - 7, np.uint64)
    for j in range(8):
        words |= x[j:len(x) - 7 + j].astype(np.uint64) << np.uint64(8 * j)
    h = np.zeros(n, np.uint64)
    for i, m in enumerate(_MULTS):
        h ^= words[8 * i:8 * i + n] * m
    return h


class Matcher:
    """Exact matches of the new file in the base, and the XOR-or-insert decision between them."""

    def __init__(self, base: bytes, new: bytes) -> None:
        self.base, self.new = np.frombuffer(base, np.uint8), np.frombuffer(new, np.uint8)
        sampled = _window_hashes(self.base)[::STEP]
        order = np.argsort(sampled, kind="stable")
        self._keys, self._pos = sampled[order], order.astype(np.int64) * STEP
        h = _window_hashes(self.new)
        if len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, h), len(self._keys) - 1)
            hit = self._keys[at] == h
            self._cq, self._cp = np.flatnonzero(hit), self._pos[at[hit]]
        else:
            self._cq = self._cp = np.zeros(0, np.int64)

    def _forward(self, q: int, p: int, end: int) -> int:
        n, size = 0, 256
        while q + n < end and p + n < len(self.base):
            m = min(size, end - q - n, len(self.base) - p - n)
            diff = np.flatnonzero(self.new[q + n:q + n + m] != self.base[p + n:p + n + m])
            if len(diff):
                return n + int(diff[0])
            n, size = n + m, size * 2
        return n

    def _backward(self, q: int, p: int, limit: int) -> int:
        n = 0
        while n < limit and self.new[q - n - 1] == self.base[p - n - 1]:
            n += 1
        return n

    def ops(self, start: int, end: int) -> list[Op]:
        """Ops that write new[start:end]."""
        out: list[Op] = []
        pending, shift = start, None  # the unmatched region starts at pending; shift: the last copy's p - q
        ci = int(np.searchsorted(self._cq, start))
        while ci < len(self._cq) and self._cq[ci] <= end - WINDOW:
            q, p = int(self._cq[ci]), int(self._cp[ci])
            if shift is not None and 0 <= q + shift <= len(self.base) - WINDOW \
                    and np.array_equal(self.base[q + shift:q + shift + WINDOW], self.new[q:q + WINDOW]):
                p = q + shift  # the previous copy's alignment continues: usually the longer match
            length = self._forward(q, p, end)
            back = self._backward(q, p, min(q - pending, p))
            q, p, length = q - back, p - back, length + back
            if length < MIN_COPY:
                ci += 1
                continue
            out += self._between(pending, q, shift, p - q)
            out.append(Op(COPY, p, length))
            pending, shift = q + length, p - q
            ci = int(np.searchsorted(self._cq, pending, side="left"))
        out += self._between(pending, end, shift, None)
        return out

    def _between(self, start: int, end: int, before: int | None, after: int | None) -> list[Op]:
        """new[start:end], which matched nothing exactly: XOR the blocks that mostly agree with the base on the
        neighbouring copies' alignment (a tensor changed in place), insert the rest."""
        if end <= start:
            return []
        best, shift = None, None
        for s in {before, after} - {None}:
            if 0 <= start + s and end + s <= len(self.base):
                eq = self.new[start:end] == self.base[start + s:end + s]
                if best is None or eq.sum() > best.sum():
                    best, shift = eq, s
        if best is None:
            return [self.literal(INSERT, start, end - start)]
        share = np.add.reduceat(best.astype(np.int32), np.arange(0, len(best), XOR_BLOCK)) / XOR_BLOCK
        xor = share >= XOR_SHARE
        cuts = [0, *(np.flatnonzero(np.diff(xor)) + 1).tolist(), len(xor)]  # runs of blocks alike
        out = []
        for i, j in zip(cuts, cuts[1:]):
            a, b = start + i * XOR_BLOCK, min(end, start + j * XOR_BLOCK)
            out.append(self.literal(XOR, a, b - a, a + shift) if xor[i] else self.literal(INSERT, a, b - a))
        return out

    def literal(self, kind: int, at: int, length: int, base_at: int = 0, width: int | None = None) -> Op:
        """An INSERT or XOR op, planar by the element width that compresses it best (4 or 1, unless given)."""
        if width is None:
            width = 1
            if length >= 4096:
                data = self.new[at:at + length] ^ (self.base[base_at:base_at + length] if kind == XOR else 0)
                width = min((1, 4), key=lambda w: _estimate(data, w))
        return Op(kind, base_at if kind == XOR else 0, length, width)


def _estimate(data: np.ndarray, width: int) -> int:
    """Compressed size, roughly and fast: zlib level 1 of the bytes as the patch would hold them."""
    return sum(len(zlib.compress(planar(data[i:i + BLOCK], width).tobytes(), 1)) for i in range(0, len(data), BLOCK))


# --------------------------------------------------------------------------- the two candidates

def binary_ops(base: bytes, new: bytes, matcher: Matcher) -> list[Op]:
    return _merge(matcher.ops(0, len(new)))


def tensor_ops(base: bytes, new: bytes, matcher: Matcher) -> list[Op] | None:
    """None when either file is not an ONNX model with raw tensors."""
    old_t, new_t = onnx_tensors(base), onnx_tensors(new)
    if old_t is None or new_t is None:
        return None
    by_name = {t.name: t for t in old_t if t.name}
    by_content = {hashlib.sha256(base[t.start:t.end]).digest(): t for t in old_t}
    b, n = matcher.base, matcher.new
    ops: list[Op] = []
    at = 0
    for t in new_t:
        size = t.end - t.start
        old = by_name.get(t.name)
        same = by_content.get(hashlib.sha256(new[t.start:t.end]).digest())
        if same is not None:
            ops += matcher.ops(at, t.start) + [Op(COPY, same.start, size)]
        elif old is not None and old.end - old.start == size:
            # XOR or insert, planar by the element width (a fine-tune's dense small changes) or not (a pruning
            # step's sparse ones: planes would spell each position out once per byte): what compresses best
            data = {XOR: n[t.start:t.end] ^ b[old.start:old.end], INSERT: n[t.start:t.end]}
            kind, width = min(((k, w) for k in (XOR, INSERT) for w in {1, t.width}),
                              key=lambda kw: _estimate(data[kw[0]], kw[1]))
            ops += matcher.ops(at, t.start) + [Op(kind, old.start if kind == XOR else 0, size, width)]
        else:
            continue  # renamed or resized: the matcher takes it with the bytes around it
        at = t.end
    return _merge(ops + matcher.ops(at, len(new)))


def _merge(ops: list[Op]) -> list[Op]:
    """Adjacent inserts of one width, and copies that continue each other, as one op."""
    out: list[Op] = []
    for op in ops:
        last = out[-1] if out else None
        if last is not None and last.kind == op.kind == INSERT and last.width == op.width:
            out[-1] = last._replace(length=last.length + op.length)
        elif last is not None and last.kind == op.kind and op.kind in (COPY, XOR) and last.width == op.width \
                and last.offset + last.length == op.offset:
            out[-1] = last._replace(length=last.length + op.length)
        else:
            out.append(op)
    return out


CANDIDATES = {"tensors": tensor_ops, "binary": binary_ops}


def build_patches(base: bytes, new: bytes) -> dict[str, bytes | None]:
    """Each candidate's patch (the smaller of its zlib and xz encodings), None where it does not apply."""
    out: dict[str, bytes | None] = {}
    matcher = Matcher(base, new)
    for name, find in CANDIDATES.items():
        ops = find(base, new, matcher)
        if ops is None or len(ops) > MAX_OPS:
            out[name] = None
            continue
        out[name] = min((encode_ops(ops, base, new, codec) for codec in CODEC_IDS), key=len)
    return out


def choose(full_bytes: int, sizes: dict[str, int | None]) -> str:
    """The candidate to send: the smallest patch when it saves MIN_GAIN of ``full_bytes``, else ``full``."""
    name, size = min(((n, s) for n, s in sizes.items() if s is not None), key=lambda ns: ns[1], default=(None, None))
    return "full" if name is None or size > (1 - MIN_GAIN) * full_bytes else name


# --------------------------------------------------------------------------- the artifact

def model_bytes(artifact: Artifact) -> bytes:
    """The model file a full artifact carries, checked against its manifest."""
    m = artifact.manifest
    if m.encoding not in ("identity", "zlib"):
        raise ExportError(f"{artifact.dir.name}: a {m.encoding} payload is no model to build a delta against")
    raw = artifact.model_path.read_bytes()
    raw = zlib.decompress(raw) if m.encoding == "zlib" else raw
    if hashlib.sha256(raw).hexdigest() != m.raw_sha256:
        raise ExportError(f"{artifact.dir.name}: the stored model does not match its manifest's raw_sha256")
    return raw


def delta_artifact(full: Artifact, base: Artifact, key_dir: Path) -> DeltaChoice:
    """The smallest way to bring a device that runs ``base``'s model to ``full``'s: a signed delta artifact beside
    ``full`` (``<full>-from-v<base>``), or ``full`` itself when no delta saves MIN_GAIN of its payload."""
    t0 = time.perf_counter()
    m = full.manifest
    if m.kind != "model" or base.manifest.kind != "model" or base.version >= full.version:
        raise ExportError(f"no delta from {base.dir.name} to {full.dir.name}: both models, the base the older")
    old, new = model_bytes(base), model_bytes(full)
    patches = build_patches(old, new)
    sizes = {name: len(p) if p is not None else None for name, p in patches.items()}
    name = choose(full.size_bytes, sizes)
    if name == "full":
        return DeltaChoice(full, base.version, full.size_bytes, sizes, "full", time.perf_counter() - t0)
    patch = patches[name]
    out = full.dir.with_name(f"{full.dir.name}-from-v{base.version}")
    manifest = dataclasses.replace(
        m, encoding="delta", delta=Delta(base.version, base.manifest.raw_sha256, "ops"), length=len(patch),
        sha256=hashlib.sha256(patch).hexdigest(), chunks=-(-len(patch) // m.chunk_size),
        url=f"{m.url.rsplit('/', 2)[0]}/{out.name}/{payload_name(m.filename, 'delta')}" if m.url else None)
    envelope, checked = _sign(manifest, load_or_create(key_dir), out.name)
    artifact = write_artifact(out, patch, envelope, checked, key_dir)
    log.info("%s: %s delta from v%d, %d bytes (full %d)", out.name, name, base.version, len(patch), full.size_bytes)
    return DeltaChoice(artifact, base.version, full.size_bytes, sizes, name, time.perf_counter() - t0)
