import copy

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.errors import ProtocolError, VerificationError
from device_agent.manifest import Manifest, decode_tensor, encode_tensor, keyid, sign_envelope, verify_envelope
from device_agent.protocol import ResultCode


def body(**over):
    b = {"type": "edgefleet.manifest", "manifest_version": 1, "name": "m", "version": 3, "target": "rpi4",
         "created": "2026-01-01T00:00:00+00:00", "expires": None, "runtime": "onnxruntime",
         "artifact": {"filename": "model.onnx", "length": 100, "sha256": "0" * 64, "chunk_size": 32, "chunks": 4},
         "io": {}, "golden": {"cases": []}}
    b.update(over)
    return b


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_signature_verifies_and_binds_every_field(key):
    env = sign_envelope(body(), key)
    trusted = {keyid(key.public_key()): key.public_key()}
    assert Manifest.from_signed(verify_envelope(env, trusted)).version == 3
    tampered = copy.deepcopy(env)
    tampered["signed"]["artifact"]["sha256"] = "1" * 64
    with pytest.raises(VerificationError, match="does not verify") as err:
        verify_envelope(tampered, trusted)
    assert err.value.result_code == ResultCode.INTEGRITY_FAILURE


def test_untrusted_key_is_refused(key):
    other = Ed25519PrivateKey.generate()
    env = sign_envelope(body(), other)
    with pytest.raises(VerificationError, match="none of which this device trusts"):
        verify_envelope(env, {keyid(key.public_key()): key.public_key()})
    with pytest.raises(VerificationError, match="envelope"):
        verify_envelope({"signed": body()}, {})


def test_inconsistent_artifact_fields_are_refused():
    with pytest.raises(ProtocolError, match="disagree"):
        Manifest.from_signed(body(artifact={"filename": "m.onnx", "length": 100, "sha256": "0", "chunk_size": 32,
                                            "chunks": 3}))
    with pytest.raises(ProtocolError, match="plain file name"):
        Manifest.from_signed(body(artifact={"filename": "../x", "length": 1, "sha256": "0", "chunk_size": 1,
                                            "chunks": 1}))
    with pytest.raises(ProtocolError, match="missing or bad field"):
        Manifest.from_signed({k: v for k, v in body().items() if k != "target"})


def test_expired_manifest_is_refused():
    m = Manifest.from_signed(body(expires="2020-01-01T00:00:00+00:00"))
    with pytest.raises(VerificationError, match="expired"):
        m.check_expiry()


def test_tensors_round_trip():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(decode_tensor(encode_tensor(a), "t"), a)
    with pytest.raises(ProtocolError, match="not a tensor"):
        decode_tensor({"dtype": "float32", "shape": [5], "data": "AAAA"}, "golden")


def test_payload_decoding_refuses_bombs_and_wrong_hashes(tmp_path):
    import dataclasses
    import hashlib
    import zlib

    from device_agent.manifest import decode_payload

    raw = bytes(1 << 20)  # 1 MiB of zeros deflates to ~1 KiB
    src = tmp_path / "payload"
    src.write_bytes(zlib.compress(raw, 9))
    m = dataclasses.replace(Manifest.from_signed(body()), encoding="zlib", raw_length=len(raw),
                            raw_sha256=hashlib.sha256(raw).hexdigest())
    decode_payload(src, tmp_path / "ok", m)
    assert (tmp_path / "ok").read_bytes() == raw
    with pytest.raises(VerificationError, match="more than raw_length 4096"):
        decode_payload(src, tmp_path / "bomb", dataclasses.replace(m, raw_length=4096))
    with pytest.raises(VerificationError, match="decoded model"):
        decode_payload(src, tmp_path / "bad", dataclasses.replace(m, raw_sha256="0" * 64))


def test_to_signed_is_the_inverse_of_from_signed():
    """One schema, both ends: the host builds the body it signs with the device's own type."""
    m = Manifest.from_signed(body())
    again = Manifest.from_signed(m.to_signed())
    assert again == m
    assert Manifest.from_signed(again.to_signed()).to_signed() == m.to_signed()
