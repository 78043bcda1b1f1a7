"""device_agent.delta: the ops patch rebuilds exactly the new file from the base, and on untrusted bytes applying
is total (one DeltaError), bounded, and never leaves a file that passes as the new model."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.delta import (
    BASE_MISMATCH, COPY, DELTA_FAILED, HEADER, INSERT, MAX_OPS, OP, XOR, Delta, DeltaError, Op, apply_delta,
    encode_ops, interleaved, planar,
)
from device_agent.errors import ProtocolError, VerificationError
from device_agent.manifest import Manifest, decode_payload
from device_agent.protocol import ResultCode

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731


@st.composite
def patches(draw):
    """(base, new, ops, codec): ops drawn at random against a random base, new the bytes they write."""
    base = draw(st.binary(min_size=1, max_size=3000))
    ops, parts = [], []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from([COPY, INSERT, XOR]))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        if kind == INSERT:
            data = draw(st.binary(min_size=1, max_size=700))
            ops.append(Op(INSERT, 0, len(data), width))
            parts.append(data)
            continue
        offset = draw(st.integers(0, len(base) - 1))
        length = draw(st.integers(1, len(base) - offset))
        if kind == COPY:
            ops.append(Op(COPY, offset, length))
            parts.append(base[offset:offset + length])
        else:  # XOR: new bytes near the base's, as a fine-tune leaves them
            flips = draw(st.binary(min_size=length, max_size=length))
            old = np.frombuffer(base[offset:offset + length], np.uint8)
            mask = np.frombuffer(flips, np.uint8) & np.uint8(draw(st.sampled_from([0x01, 0x0F, 0xFF])))
            ops.append(Op(XOR, offset, length, width))
            parts.append((old ^ mask).tobytes())
    return base, b"".join(parts), ops, draw(st.sampled_from(["zlib", "xz"]))


def _apply(d: Path, patch: bytes, base: bytes, new: bytes, delta: Delta | None = None) -> Path:
    (d / "patch").write_bytes(patch)
    (d / "base").write_bytes(base)
    apply_delta(d / "patch", d / "base", d / "out", delta or Delta(1, sha(base)), len(new), sha(new))
    return d / "out"


@SETTINGS
@given(case=patches())
def test_any_ops_round_trip(case):
    base, new, ops, codec = case
    with tempfile.TemporaryDirectory() as tmp:
        out = _apply(Path(tmp), encode_ops(ops, base, new, codec), base, new)
        assert out.read_bytes() == new


@SETTINGS
@given(data=st.binary(max_size=5000), width=st.sampled_from([1, 2, 4, 8]))
def test_planar_layout_inverts(data, width):
    x = np.frombuffer(data, np.uint8)
    assert interleaved(planar(x, width), width).tobytes() == data


def _mutate(draw, patch: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "append", "splice", "header"]))
    b = bytearray(patch)
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        del b[draw(st.integers(0, len(b) - 1)):]
    elif how == "append":
        b += draw(st.binary(min_size=1, max_size=64))
    elif how == "splice":
        i = draw(st.integers(0, len(b)))
        b[i:i + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
    else:  # a header field at any value
        field = draw(st.sampled_from(range(6)))
        values = list(HEADER.unpack(bytes(b[:HEADER.size])))
        limits = [None, 255, 255, 2**32 - 1, 2**64 - 1, 2**64 - 1]
        values[field] = draw(st.binary(min_size=4, max_size=4)) if field == 0 else draw(st.integers(0, limits[field]))
        b[:HEADER.size] = HEADER.pack(*values)
    return bytes(b)


@SETTINGS
@given(case=patches(), data=st.data())
def test_a_corrupted_patch_is_refused_or_rebuilds_exactly_the_new_file(case, data):
    """Whatever the damage: DeltaError, or the new file byte for byte; the base untouched, nothing else written."""
    base, new, ops, codec = case
    patch = _mutate(data.draw, encode_ops(ops, base, new, codec))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        try:
            out = _apply(d, patch, base, new)
        except DeltaError as exc:
            assert exc.reason == DELTA_FAILED and str(exc).startswith(DELTA_FAILED)
            assert exc.result_code == ResultCode.INTEGRITY_FAILURE
        else:
            assert out.read_bytes() == new
        assert sorted(p.name for p in d.iterdir()) in (["base", "patch"], ["base", "out", "patch"])
        assert (d / "base").read_bytes() == base


@SETTINGS
@given(patch=st.binary(max_size=400), base=st.binary(min_size=1, max_size=200),
       length=st.integers(1, 1000))
def test_random_bytes_are_one_delta_error(patch, base, length):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with pytest.raises(DeltaError):
            _apply(d, patch, base, b"\0" * length)


@SETTINGS
@given(base=st.binary(min_size=1, max_size=300), new=st.binary(min_size=1, max_size=300),
       records=st.binary(max_size=40 * OP.size))
def test_any_op_table_is_checked_before_a_byte_is_written(base, new, records):
    """Op records of any value inside a well-formed stream: applied exactly, or refused with no output file."""
    count = len(records) // OP.size
    table = records[:count * OP.size]
    body = HEADER.pack(b"EFDP", 1, 1, count, len(base), len(new)) + zlib.compress(table + new)
    ops = [Op(k, o, n, w) for k, w, o, n in OP.iter_unpack(table)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        try:
            out = _apply(d, body, base, new)
        except DeltaError:
            valid = all(op.kind in (0, 1, 2) and op.width in (1, 2, 4, 8) for op in ops)
            assert not (d / "out").exists() or valid
        else:
            assert out.read_bytes() == new


def test_bounds_on_ops_and_base(tmp_path):
    base, new = b"b" * 100, b"n" * 50
    too_many = HEADER.pack(b"EFDP", 1, 1, MAX_OPS + 1, 100, 50) + zlib.compress(b"")
    with pytest.raises(DeltaError, match="at most"):
        _apply(tmp_path, too_many, base, new)
    plain = encode_ops([Op(INSERT, 0, 50)], base, new)
    table = OP.pack(COPY, 1, 90, 50)  # reads base bytes [90, 140) of 100
    forged = HEADER.pack(b"EFDP", 1, 1, 1, 100, 50) + zlib.compress(table)
    with pytest.raises(DeltaError, match=r"reads base bytes \[90, 140\) of 100"):
        _apply(tmp_path, forged, base, new)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DeltaError, match="writes 40 bytes|write 40 bytes"):
        _apply(tmp_path, HEADER.pack(b"EFDP", 1, 1, 1, 100, 50) + zlib.compress(OP.pack(COPY, 1, 0, 40)), base,
               new)
    # more literal bytes than the ops take: a bomb in the stream is refused, not written
    bomb = HEADER.pack(b"EFDP", 1, 1, 1, 100, 50) + zlib.compress(OP.pack(INSERT, 1, 0, 50) + b"n" * 10_000_000)
    with pytest.raises(DeltaError, match="more literal bytes"):
        _apply(tmp_path, bomb, base, new)
    # an xz stream asking for more memory than the agent allows
    greedy = lzma.compress(OP.pack(INSERT, 1, 0, 50) + new, lzma.FORMAT_XZ,
                           filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 30}])
    with pytest.raises(DeltaError, match="damaged patch"):
        _apply(tmp_path, HEADER.pack(b"EFDP", 1, 2, 1, 100, 50) + greedy, base, new)
    assert _apply(tmp_path, plain, base, new).read_bytes() == new


@pytest.mark.parametrize("codec", ["zlib", "xz"])
def test_a_header_promising_more_ops_than_the_stream_holds(tmp_path, codec):
    """Found by the corruption property: an xz decoder read past its end raised EOFError, not DeltaError."""
    patch = bytearray(encode_ops([Op(COPY, 0, 1)], b"\0", b"\0", codec))
    magic, version, cid, _, blen, nlen = HEADER.unpack(bytes(patch[:HEADER.size]))
    patch[:HEADER.size] = HEADER.pack(magic, version, cid, 3, blen, nlen)
    with pytest.raises(DeltaError, match="ends before its ops do"):
        _apply(tmp_path, bytes(patch), b"\0", b"\0")


def test_the_base_must_be_what_the_device_runs(tmp_path):
    base, new = b"old model" * 100, b"new model" * 100
    patch = encode_ops([Op(INSERT, 0, len(new))], base, new)
    (tmp_path / "patch").write_bytes(patch)
    (tmp_path / "other").write_bytes(base + b"!")
    delta = Delta(7, sha(base))
    for where in (None, tmp_path / "missing", tmp_path / "other"):
        with pytest.raises(DeltaError) as err:
            apply_delta(tmp_path / "patch", where, tmp_path / "out", delta, len(new), sha(new))
        assert err.value.reason == BASE_MISMATCH and "v7" in str(err.value)
        assert err.value.result_code == ResultCode.UNSUPPORTED_PACKAGE
        assert not (tmp_path / "out").exists()
    (tmp_path / "base").write_bytes(base)
    with pytest.raises(DeltaError, match="rebuilt model has 900 bytes"):  # signed for another result
        apply_delta(tmp_path / "patch", tmp_path / "base", tmp_path / "out", delta, len(new), "0" * 64)


def test_applying_streams_in_bounded_memory(tmp_path):
    """16 MB rebuilt from a 16 MB base: the applier holds blocks, never either file."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    new = bytearray(base)
    new[1 << 20:2 << 20] = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    new = bytes(new)
    ops = [Op(COPY, 0, 1 << 20), Op(XOR, 1 << 20, 1 << 20, 4), Op(COPY, 2 << 20, len(base) - (2 << 20))]
    patch = encode_ops(ops, base, new, "zlib")
    (tmp_path / "patch").write_bytes(patch)
    (tmp_path / "base").write_bytes(base)
    delta, new_sha, new_length = Delta(1, sha(base)), sha(new), len(new)
    del base, new
    tracemalloc.start()
    try:
        apply_delta(tmp_path / "patch", tmp_path / "base", tmp_path / "out", delta, new_length, new_sha)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes at the peak"  # blocks of 64 KiB and the base hashed 1 MiB at a time


# --------------------------------------------------------------------------- the manifest's leaf

BODY = {
    "type": "edgefleet.manifest", "manifest_version": 1, "name": "m", "version": 3, "target": "rpi4",
    "runtime": "onnxruntime", "created": "2026-12-01T00:00:00+00:00", "expires": None,
    "artifact": {"filename": "m.onnx", "length": 100, "sha256": "a" * 64, "chunk_size": 32, "chunks": 4,
                 "encoding": "delta", "raw_length": 900, "raw_sha256": "b" * 64},
    "io": {}, "golden": {}, "delta": {"base_version": 2, "base_sha256": "c" * 64, "format": "ops"},
}


def test_delta_leaf_round_trips_and_is_absent_without_one():
    m = Manifest.from_signed(json.loads(json.dumps(BODY)))
    assert m.delta == Delta(2, "c" * 64, "ops") and m.encoding == "delta"
    assert Manifest.from_signed(m.to_signed()) == m and m.to_signed()["delta"] == BODY["delta"]
    full = json.loads(json.dumps(BODY))
    del full["delta"]
    full["artifact"]["encoding"] = "identity"
    assert "delta" not in Manifest.from_signed(full).to_signed()


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("delta"), "without a delta leaf"),
    (lambda b: b["artifact"].update(encoding="zlib"), "with a delta leaf"),
    (lambda b: b["delta"].update(base_version=3), "older version"),
    (lambda b: b.update(kind="calibration"), "older version|a calibration"),
    (lambda b: b["delta"].update(format="bsdiff"), r"this agent applies \['ops'\]"),
    (lambda b: b["delta"].update(base_sha256="C" * 64), "64 lowercase hex"),
    (lambda b: b["delta"].update(extra=1), "unknown key 'extra'"),
    (lambda b: b["delta"].update(base_version=True), "base_version"),
])
def test_delta_leaf_is_refused_when_it_does_not_fit(change, message):
    body = json.loads(json.dumps(BODY))
    change(body)
    with pytest.raises(ProtocolError, match=message):
        Manifest.from_signed(body)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                        max_size=4), max_leaves=12)


@SETTINGS
@given(value=json_values | st.fixed_dictionaries(
    {"base_version": json_values | st.integers(), "base_sha256": json_values | st.just("c" * 64),
     "format": json_values | st.just("ops")}))
def test_delta_leaf_parse_is_total(value):
    try:
        d = Delta.from_dict(value)
    except ProtocolError:
        return
    assert Delta.from_dict(d.to_dict()) == d


def test_decode_payload_applies_a_delta_against_the_base(tmp_path):
    base, new = os.urandom(5000), None
    new = base[:2000] + b"head" * 100 + base[2000:]
    patch = encode_ops([Op(COPY, 0, 2000), Op(INSERT, 0, 400, 4), Op(COPY, 2000, 3000)], base, new)
    body = json.loads(json.dumps(BODY))
    body["artifact"].update(length=len(patch), chunks=-(-len(patch) // 32), sha256=sha(patch), raw_length=len(new),
                            raw_sha256=sha(new))
    body["delta"]["base_sha256"] = sha(base)
    m = Manifest.from_signed(body)
    (tmp_path / "patch").write_bytes(patch)
    (tmp_path / "active.onnx").write_bytes(base)
    decode_payload(tmp_path / "patch", tmp_path / "decoded", m, base=tmp_path / "active.onnx")
    assert (tmp_path / "decoded").read_bytes() == new
    with pytest.raises(VerificationError, match=BASE_MISMATCH):
        decode_payload(tmp_path / "patch", tmp_path / "decoded2", m, base=None)
    assert struct.calcsize(">BBQQ") == OP.size == 18
