"""What keeps the agent small on the device, each checked against the library it replaces: Ed25519 verification
through the process's own OpenSSL (against ``cryptography``), its memory and CPU share from the kernel (against
``psutil``), the C heap handed back after a model is loaded, and an agent that imports none of the replaced
packages."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import ed25519 as ed
from device_agent.heap import release_free_memory
from device_agent.procstat import CpuShare, rss_mb

OPENSSL = ed.open_libcrypto()
CRYPTOGRAPHY = ed.Cryptography()


def test_this_python_verifies_through_its_own_openssl():
    """Linux CPython links libcrypto: the agent must find it, or it would carry cryptography's 8 MB again."""
    assert OPENSSL is not None, "no libcrypto with Ed25519 found in this process"
    assert ed.backend_name() == "openssl"


# RFC 8032, section 7.1: TEST 1 (empty message), TEST 3 (two bytes), TEST SHA(abc)
VECTORS = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24"
     "655141438e7a100b"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28d"
     "c027beceea1ec40a"),
    ("ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2"
     "a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17a"
     "d9bef1177331a704"),
]


@pytest.mark.parametrize("backend", [OPENSSL, CRYPTOGRAPHY], ids=["openssl", "cryptography"])
@pytest.mark.parametrize("key,message,sig", VECTORS)
def test_rfc8032_vectors_verify_and_any_change_does_not(backend, key, message, sig):
    key, message, sig = bytes.fromhex(key), bytes.fromhex(message), bytes.fromhex(sig)
    assert backend.verify(key, sig, message)
    assert not backend.verify(key, sig, message + b"\0")
    assert not backend.verify(key, bytes([sig[0] ^ 1]) + sig[1:], message)
    assert not backend.verify(bytes([key[0] ^ 1]) + key[1:], sig, message)


@settings(max_examples=60, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=2048),
       flip=st.integers(0, 64 * 8 - 1), junk=st.binary(min_size=64, max_size=64))
def test_both_backends_agree_on_signatures_tampered_ones_and_junk(seed, message, flip, junk):
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = private.sign(message)
    tampered = bytearray(sig)
    tampered[flip // 8] ^= 1 << (flip % 8)
    for candidate, expected in ((sig, True), (bytes(tampered), False), (junk, None)):
        verdicts = {OPENSSL.verify(raw, candidate, message), CRYPTOGRAPHY.verify(raw, candidate, message)}
        assert len(verdicts) == 1  # the same verdict from both
        if expected is not None:
            assert verdicts == {expected}
    key = ed.PublicKey(raw)
    assert key.verify(sig, message) and not key.verify(sig[:63], message) and not key.verify(sig + b"\0", message)


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(min_size=32, max_size=32), sig=st.binary(max_size=80), message=st.binary(max_size=64))
def test_any_bytes_for_a_key_give_a_verdict_not_a_crash(raw, sig, message):
    """Points off the curve, small-order keys, signatures of any length: False, as cryptography says."""
    assert ed.PublicKey(raw).verify(sig, message) is (len(sig) == 64 and CRYPTOGRAPHY.verify(raw, sig, message))


def test_keys_are_read_from_the_hosts_pem_and_nothing_else_is_taken():
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = ed.PublicKey.from_pem(pem)
    assert key.raw == private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.verify(private.sign(b"m"), b"m")
    others = {
        "EC P-256": ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "RSA": rsa.generate_private_key(65537, 1024).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "a private key": private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()),
        "garbage": b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
        "empty": b"",
    }
    for what, data in others.items():
        with pytest.raises(ValueError):
            ed.PublicKey.from_pem(data)
            pytest.fail(f"{what} was taken as an Ed25519 key")


def test_memory_and_cpu_share_read_as_psutil_reads_them():
    proc = psutil.Process()
    assert rss_mb() == pytest.approx(proc.memory_info().rss / 2**20, rel=0.05)
    share = CpuShare()
    proc.cpu_percent(None)
    x = 0
    for i in range(2_000_000):  # a busy stretch both count over
        x += i * i
    assert share.percent() == pytest.approx(proc.cpu_percent(None), abs=15)
    assert x


def test_memory_freed_by_a_load_goes_back_to_the_kernel():
    """As a session load leaves it: many blocks under the mmap threshold freed below one still in use."""
    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.fail("this Linux C library has no malloc_trim: the agent keeps what a model load freed")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # 64 KB blocks come from the heap, not mmap
    script = r"""
import json, sys, numpy as np
from device_agent.heap import release_free_memory
from device_agent.procstat import rss_mb
blocks = [np.ones(16384, np.float32) for _ in range(1500)]  # ~94 MB of 64 KB blocks
keep = blocks[-1]
before = rss_mb()
del blocks
freed = rss_mb()
release_free_memory()
print(json.dumps([before, freed, rss_mb()]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    before, freed, trimmed = json.loads(out.stdout)
    assert freed > before - 20  # glibc kept what was freed below the block in use
    assert trimmed < freed - 60, (before, freed, trimmed)
    assert release_free_memory() in (True, False)


def test_the_agent_imports_none_of_what_it_replaced():
    script = r"""
import sys, json
import device_agent.agent, device_agent.cli
from device_agent import ed25519
ed25519.backend_name()
print(json.dumps(sorted(m for m in ("cryptography", "psutil", "http.server") if m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
