"""Delta updates: a patch that rebuilds the new model file from the one the device runs, both ends' schema.

A manifest may carry ``delta`` (:class:`Delta`: ``{"base_version", "base_sha256", "format"}``), its artifact then
has ``encoding: "delta"``: the payload (``length``, ``sha256``) is a patch against the model whose sha256 is
``base_sha256``, and ``raw_length`` / ``raw_sha256`` stay the new model's. The agent applies it against its active
slot's model file (:func:`apply_delta`), streaming into the decoded file, and checks the result's hash before
anything else; a refusal's reason starts with :data:`BASE_MISMATCH` or :data:`DELTA_FAILED`, which the host acts on
(it sends the full artifact instead).

The patch format ``ops`` (version 1), big-endian::

    header  magic b"EFDP", version u8 = 1, codec u8 (1 zlib, 2 xz), 2 zero bytes,
            ops u32, base_length u64, new_length u64                              (28 bytes)
    stream  one compressed stream (the codec's) holding the op records, then the literal bytes
    op      kind u8 (0 COPY, 1 INSERT, 2 XOR), width u8 (1, 2, 4 or 8), offset u64, length u64     (18 bytes)

The ops write the new file front to back: COPY takes ``length`` bytes of the base at ``offset``; INSERT takes
``length`` literal bytes; XOR takes ``length`` literal bytes and XORs them with the base's at ``offset`` (an
unchanged byte is a zero: a fine-tuned tensor against its old self). Literal bytes of an op of ``width`` w > 1 are
byte-planar per block of :data:`BLOCK` bytes (all first bytes of the block's w-byte elements, then all second bytes
...; a short block's tail of fewer than w bytes as it is), so that the exponents of float weights sit together.
The host finds the ops two ways (pipeline.bundle.delta: per tensor of an ONNX file, or by matching bytes), the
device has one applier.

Applying is total and bounded on untrusted bytes: every op is checked before a byte is written (kinds, widths,
offsets within the base, lengths adding up to the manifest's raw length, at most :data:`MAX_OPS`), the stream is
read in blocks (memory: a block, the codec's window, the op table, whatever the patch says), and any fault is one
:class:`DeltaError` (a VerificationError); nothing but the output file is written.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import ProtocolError, VerificationError
from .protocol import ResultCode, short

#: the reasons a refused delta starts with: the host sends the full artifact after either
BASE_MISMATCH = "delta_base_mismatch"
DELTA_FAILED = "delta_failed"

MAGIC, VERSION = b"EFDP", 1
HEADER = struct.Struct(">4sBBxxIQQ")
OP = struct.Struct(">BBQQ")
COPY, INSERT, XOR = 0, 1, 2
WIDTHS = (1, 2, 4, 8)
#: op records one patch may hold (18 bytes each: 4.7 MB of table at most)
MAX_OPS = 1 << 18
#: the planar block of literal bytes, and the most the applier holds of the base or the stream at once
BLOCK = 1 << 16
#: memory the xz decoder may use (the host's encoder asks for an 8 MiB dictionary)
XZ_MEMLIMIT = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DeltaError(VerificationError):
    """A delta that cannot rebuild the new model here: its base is not what the device runs (``BASE_MISMATCH``,
    result code 6: this package is not for this device as it is), or the patch is damaged or rebuilds something
    else (``DELTA_FAILED``, result code 5). The message starts with the reason."""

    def __init__(self, reason: str, message: str) -> None:
        code = ResultCode.UNSUPPORTED_PACKAGE if reason == BASE_MISMATCH else ResultCode.INTEGRITY_FAILURE
        super().__init__(f"{reason}: {message}", code)
        self.reason = reason


# --------------------------------------------------------------------------- the manifest's delta leaf

@dataclass(frozen=True)
class Delta:
    """Signed into a manifest whose payload is a patch: against which model, in which format."""

    base_version: int
    base_sha256: str
    format: str = "ops"

    KEYS = ("base_version", "base_sha256", "format")

    @classmethod
    def from_dict(cls, obj: Any, where: str = "manifest: delta") -> "Delta":
        """Total: a Delta, or ProtocolError naming the field."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"{where}: expected an object {{{', '.join(cls.KEYS)}}}, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in cls.KEYS]
        if unknown:
            raise ProtocolError(f"{where}: unknown key {short(unknown[0], 40)}; known: {', '.join(cls.KEYS)}")
        version, digest, fmt = obj.get("base_version"), obj.get("base_sha256"), obj.get("format")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**53:
            raise ProtocolError(f"{where}.base_version: expected a model version, got {short(version, 40)}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ProtocolError(f"{where}.base_sha256: expected 64 lowercase hex digits, got {short(digest, 80)}")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ProtocolError(f"{where}.format: {short(fmt, 40)} unknown; this agent applies {sorted(FORMATS)}")
        return cls(version, digest, fmt)

    def to_dict(self) -> dict[str, Any]:
        return {"base_version": self.base_version, "base_sha256": self.base_sha256, "format": self.format}


# --------------------------------------------------------------------------- ops and the literal layout

class Op(NamedTuple):
    kind: int  # COPY, INSERT or XOR
    offset: int  # in the base (COPY, XOR); 0 for INSERT
    length: int
    width: int = 1  # literal bytes are planar over elements of this many bytes (INSERT, XOR)


def check_ops(ops: list[Op], base_length: int, new_length: int) -> int:
    """The literal bytes the ops take; DeltaError unless they are valid ops that write ``new_length`` bytes."""
    if len(ops) > MAX_OPS:
        raise DeltaError(DELTA_FAILED, f"{len(ops)} ops, at most {MAX_OPS}")
    total = literal = 0
    for i, op in enumerate(ops):
        if op.kind not in (COPY, INSERT, XOR) or op.width not in WIDTHS or op.length < 1:
            raise DeltaError(DELTA_FAILED, f"op {i}: kind {op.kind}, width {op.width}, length {op.length}: not an op")
        if op.kind != INSERT and op.offset + op.length > base_length:
            raise DeltaError(DELTA_FAILED, f"op {i} reads base bytes [{op.offset}, {op.offset + op.length}) of "
                                           f"{base_length}")
        if op.kind == INSERT and op.offset != 0:
            raise DeltaError(DELTA_FAILED, f"op {i}: an insert has offset 0, got {op.offset}")
        total += op.length
        literal += op.length if op.kind != COPY else 0
    if total != new_length:
        raise DeltaError(DELTA_FAILED, f"the ops write {total} bytes, the new model has {new_length}")
    return literal


def planar(data: np.ndarray, width: int) -> np.ndarray:
    """One block's bytes as the stream holds them (the host's side); :func:`interleaved` inverts it."""
    m = len(data) // width * width
    if width == 1 or m == 0:
        return data
    return np.concatenate([data[:m].reshape(-1, width).T.ravel(), data[m:]])


def interleaved(data: np.ndarray, width: int) -> np.ndarray:
    m = len(data) // width * width
    if width == 1 or m == 0:
        return data
    return np.concatenate([data[:m].reshape(width, -1).T.ravel(), data[m:]])


# --------------------------------------------------------------------------- codecs

class _Zlib:
    def __init__(self) -> None:
        self._d, self._tail = zlib.decompressobj(), b""

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            out = self._d.decompress(self._tail + data, limit)
        except zlib.error as exc:
            raise DeltaError(DELTA_FAILED, f"damaged patch (zlib: {short(str(exc), 120)})") from None
        self._tail = self._d.unconsumed_tail
        return out

    @property
    def needs_input(self) -> bool:
        return not self._tail

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused(self) -> bytes:
        return self._d.unused_data


class _Xz:
    def __init__(self) -> None:
        self._d = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            return self._d.decompress(data, limit)
        except (lzma.LZMAError, EOFError) as exc:  # damaged, over XZ_MEMLIMIT, or read past its end
            raise DeltaError(DELTA_FAILED, f"damaged patch (xz: {short(str(exc), 120)})") from None

    @property
    def needs_input(self) -> bool:
        return self._d.needs_input

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused(self) -> bytes:
        return self._d.unused_data


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=6)  # an 8 MiB dictionary


#: codec id -> (name, decoder, the host's encoder)
CODECS: dict[int, tuple[str, Callable[[], Any], Callable[[bytes], bytes]]] = {
    1: ("zlib", _Zlib, lambda data: zlib.compress(data, 9)),
    2: ("xz", _Xz, _xz),
}
CODEC_IDS = {name: cid for cid, (name, _, _) in CODECS.items()}


class _Stream:
    """Exactly the bytes asked for from the patch's compressed stream, or DeltaError; input read a block at a
    time."""

    def __init__(self, f, decoder) -> None:
        self._f, self._d = f, decoder

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            if self._d.eof:
                raise DeltaError(DELTA_FAILED, "the patch's stream ends before its ops do")
            out = self._d.feed(b"", n - got) if not self._d.needs_input else b""
            if not out and not self._d.eof:
                chunk = self._f.read(BLOCK)
                if not chunk:
                    raise DeltaError(DELTA_FAILED, "the patch is truncated")
                out = self._d.feed(chunk, n - got)
            parts.append(out)
            got += len(out)
        return b"".join(parts)

    def finish(self) -> None:
        """The stream ends here and the patch with it: more bytes are a patch that is not this one."""
        while not self._d.eof:
            out = self._d.feed(b"", 1) if not self._d.needs_input else b""
            if not out and not self._d.eof:
                chunk = self._f.read(BLOCK)
                if not chunk:
                    raise DeltaError(DELTA_FAILED, "the patch is truncated")
                out = self._d.feed(chunk, 1)
            if out:
                raise DeltaError(DELTA_FAILED, "the patch's stream holds more literal bytes than its ops take")
        if self._d.unused or self._f.read(1):
            raise DeltaError(DELTA_FAILED, "bytes after the patch's stream")


# --------------------------------------------------------------------------- the ops format

def encode_ops(ops: list[Op], base: bytes, new: bytes, codec: str = "xz") -> bytes:
    """The host's side: the patch that rebuilds ``new`` from ``base`` by ``ops``."""
    check_ops(ops, len(base), len(new))
    b, n = np.frombuffer(base, np.uint8), np.frombuffer(new, np.uint8)
    parts = [b"".join(OP.pack(op.kind, op.width, op.offset, op.length) for op in ops)]
    at = 0
    for op in ops:
        if op.kind != COPY:
            for start in range(0, op.length, BLOCK):
                size = min(BLOCK, op.length - start)
                block = n[at + start:at + start + size]
                if op.kind == XOR:
                    block = block ^ b[op.offset + start:op.offset + start + size]
                parts.append(planar(block, op.width).tobytes())
        at += op.length
    cid = CODEC_IDS[codec]
    return HEADER.pack(MAGIC, VERSION, cid, len(ops), len(base), len(new)) + CODECS[cid][2](b"".join(parts))


def _apply_ops(patch: Path, base: Path, dst: Path, new_length: int) -> tuple[int, str]:
    """Rebuild into ``dst``; (bytes written, their sha256). DeltaError for any patch that is not valid."""
    base_length = base.stat().st_size
    with open(patch, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) != HEADER.size:
            raise DeltaError(DELTA_FAILED, f"a patch of {len(head)} bytes has no header")
        magic, version, cid, count, blen, nlen = HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or cid not in CODECS:
            raise DeltaError(DELTA_FAILED, f"not an ops patch v{VERSION} (magic {short(magic)}, version {version}, "
                                           f"codec {cid}; codecs {sorted(n for n, _, _ in CODECS.values())})")
        if blen != base_length or nlen != new_length:
            raise DeltaError(DELTA_FAILED, f"the patch is for a {blen}-byte base and a {nlen}-byte result; here the "
                                           f"base has {base_length}, the manifest says {new_length}")
        if count > MAX_OPS:
            raise DeltaError(DELTA_FAILED, f"{count} ops, at most {MAX_OPS}")
        stream = _Stream(f, CODECS[cid][1]())
        table = stream.read(count * OP.size)
        ops = [Op(kind, offset, length, width) for kind, width, offset, length in OP.iter_unpack(table)]
        check_ops(ops, base_length, new_length)
        h, written = hashlib.sha256(), 0
        with open(base, "rb") as old, open(dst, "wb") as out:
            for op in ops:
                for start in range(0, op.length, BLOCK):
                    size = min(BLOCK, op.length - start)
                    if op.kind != INSERT:
                        old.seek(op.offset + start)
                        have = old.read(size)
                        if len(have) != size:
                            raise DeltaError(DELTA_FAILED, "the base changed while the patch was applied")
                    if op.kind == COPY:
                        block = have
                    else:
                        lit = interleaved(np.frombuffer(stream.read(size), np.uint8), op.width)
                        block = (lit ^ np.frombuffer(have, np.uint8) if op.kind == XOR else lit).tobytes()
                    h.update(block)
                    out.write(block)
                    written += size
            stream.finish()
            out.flush()
            os.fsync(out.fileno())
    return written, h.hexdigest()


#: patch format name (the delta leaf's ``format``) -> applier(patch, base, dst, new_length) -> (written, sha256)
FORMATS: dict[str, Callable[[Path, Path, Path, int], tuple[int, str]]] = {"ops": _apply_ops}


# --------------------------------------------------------------------------- the device's side

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def apply_delta(patch: Path, base: Path | None, dst: Path, delta: Delta, raw_length: int, raw_sha256: str) -> None:
    """Rebuild the new model into ``dst`` from the verified ``patch`` and the model the device runs (``base``:
    the active slot's file, None without one); then its length and sha256 must be ``raw_length`` and
    ``raw_sha256``. Any failure is a DeltaError; ``dst`` is then the caller's to discard."""
    try:
        if base is None or not base.is_file():
            raise DeltaError(BASE_MISMATCH, f"the patch is against v{delta.base_version} "
                                            f"({delta.base_sha256[:16]}…), this device runs no model")
        have = sha256_of(base)
        if have != delta.base_sha256:
            raise DeltaError(BASE_MISMATCH, f"the patch is against v{delta.base_version} ({delta.base_sha256[:16]}…), "
                                            f"this device runs {have[:16]}…")
        written, digest = FORMATS[delta.format](patch, base, dst, raw_length)
    except OSError as exc:
        raise DeltaError(DELTA_FAILED, f"cannot apply the patch here: {exc}") from None
    except (MemoryError, ValueError) as exc:  # ValueError: numpy on a damaged block
        raise DeltaError(DELTA_FAILED, f"damaged patch ({type(exc).__name__}: {short(str(exc), 120)})") from None
    if written != raw_length or digest != raw_sha256:
        raise DeltaError(DELTA_FAILED, f"the rebuilt model has {written} bytes, sha256 {digest[:16]}…; the manifest "
                                       f"says {raw_length} bytes, {raw_sha256[:16]}…")
