"""Property tests: every parser of untrusted input on the device side is total. Whatever comes in, it returns
a value of its type or raises the protocol's own error (ProtocolError / VerificationError), never another."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.errors import ProtocolError, VerificationError
from device_agent.manifest import Manifest, decode_tensor, keyid, sign_envelope, verify_envelope
from device_agent.protocol import (
    MAX_DEPTH, Job, StreamGet, check_id, decode, decode_chunk, encode_chunk, json_depth, loads, parse_topic,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = Ed25519PrivateKey.generate()
TRUSTED = {keyid(KEY.public_key()): KEY.public_key()}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# bytes that look like JSON often enough to get past the first character
jsonish = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(st.sampled_from(['[', ']', '{', '}', '"', '\\', ':', ',', '1e999', 'NaN', '"\\ud800"', '-', '0',
                              'true', '"k"', ' ']), max_size=200).map(lambda xs: "".join(xs).encode()),
)

MANIFEST = {
    "type": "edgefleet.manifest", "manifest_version": 1, "name": "m", "version": 3, "target": "rpi4",
    "runtime": "onnxruntime", "created": "2026-12-01T00:00:00+00:00", "expires": "2027-01-01T00:00:00+00:00",
    "artifact": {"filename": "m.onnx", "length": 100, "sha256": "a" * 64, "chunk_size": 32, "chunks": 4},
    "io": {}, "golden": {"cases": [{"inputs": {"x": {"dtype": "float32", "shape": [1], "data": "AACAPw=="}},
                                    "outputs": [{"dtype": "float32", "shape": [1], "data": "AACAPw=="}]}]},
}


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated_manifests(draw):
    """The valid manifest with one value anywhere replaced by anything JSON can hold."""
    body = json.loads(json.dumps(MANIFEST))
    where = draw(st.sampled_from([p for p in paths(body) if p]))
    parent = body
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = draw(json_values)
    return body


@SETTINGS
@given(jsonish)
def test_loads_and_decode_are_total(payload):
    for parse in (lambda: loads(payload, "x"), lambda: decode(payload, "x"), lambda: Job.parse(payload),
                  lambda: StreamGet.parse(payload)):
        try:
            parse()
        except ProtocolError:
            pass


@SETTINGS
@given(jsonish)
def test_what_loads_accepts_is_shallow_finite_and_encodable(payload):
    try:
        value = loads(payload, "x")
    except ProtocolError:
        return
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)  # raises on NaN/inf or a lone surrogate
    text.encode()
    assert json_depth(text.encode()) <= MAX_DEPTH


@SETTINGS
@given(st.integers(0, 200), st.sampled_from(["[", "{\"a\":"]))
def test_nesting_past_the_bound_is_refused_before_parsing(extra, opener):
    depth = MAX_DEPTH + 1 + extra
    closer = "]" if opener == "[" else "}"
    payload = (opener * depth + "1" + closer * depth).encode()
    with pytest.raises(ProtocolError, match="nested"):
        loads(payload, "x")


@SETTINGS
@given(st.text(max_size=120), st.text(max_size=20))
def test_topics_parse_or_refuse(name, prefix):
    try:
        device, leaf = parse_topic(prefix, name)
    except ProtocolError:
        return
    assert name == f"{prefix}/v1/{device}/{leaf.value}"


@SETTINGS
@given(st.one_of(st.text(max_size=80), json_values))
def test_ids_are_topic_levels(value):
    try:
        check_id(value, "id")
    except ProtocolError:
        return
    assert isinstance(value, str) and 1 <= len(value) <= 64 and not set(value) & set("/+#\0 ")


@SETTINGS
@given(st.binary(max_size=400))
def test_chunk_frames_are_total(frame):
    try:
        decode_chunk(frame)
    except ProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 1000), st.data())
def test_a_chunk_frame_round_trips_and_any_damage_is_caught(data, index, draw):
    frame = encode_chunk("j1", index, data)
    assert decode_chunk(frame) == ("j1", index, data)
    at = draw.draw(st.integers(0, len(frame) - 1))
    damaged = bytearray(frame)
    damaged[at] ^= draw.draw(st.integers(1, 255))
    try:
        got = decode_chunk(bytes(damaged))
    except ProtocolError:
        return
    assert got != ("j1", index, data) or bytes(damaged) == frame  # a change is never read as the same chunk


@SETTINGS
@given(json_values, st.sampled_from(list(TRUSTED)))
def test_envelopes_are_total(envelope, trusted_keyid):
    for value in (envelope, {"signed": MANIFEST, "signatures": [{"keyid": trusted_keyid, "sig": envelope}]},
                  {"signed": envelope, "signatures": [{"keyid": trusted_keyid, "sig": "AAAA"}]}):
        with pytest.raises(VerificationError):
            verify_envelope(value, TRUSTED)


@SETTINGS
@given(mutated_manifests())
def test_signed_manifests_are_total(body):
    """Even a correctly signed manifest (a host bug, a stolen key) is parsed into a Manifest or refused."""
    envelope = sign_envelope(body, KEY)
    signed = verify_envelope(json.loads(json.dumps(envelope)), TRUSTED)
    try:
        m = Manifest.from_signed(signed)
        m.check_expiry()
        m.golden_pairs()
    except (ProtocolError, VerificationError):
        pass


@SETTINGS
@given(json_values)
def test_tensors_are_total(obj):
    try:
        decode_tensor(obj, "t")
    except ProtocolError:
        pass


@SETTINGS
@given(st.sampled_from(["status", "metrics", "event"]), st.dictionaries(
    st.sampled_from(["device_id", "state", "target", "kind", "message", "version", "active_version", "job_id",
                     "latency_ms_p50", "latency_ms_p95", "rss_mb", "runs", "emulated", "ts", "boot", "seq", "x"]),
    json_values, max_size=12))
def test_device_messages_parse_into_their_type_or_refuse(kind, body):
    from dataclasses import asdict

    from device_agent.protocol import Event, Metrics, Status, encode

    cls = {"status": Status, "metrics": Metrics, "event": Event}[kind]
    try:
        message = cls.parse(encode(body))
    except ProtocolError:
        return
    assert cls.parse(encode(message)) == message  # what parses, round-trips
    assert all(k in body or v == getattr(cls, k, v) or k == "ts" for k, v in asdict(message).items())
