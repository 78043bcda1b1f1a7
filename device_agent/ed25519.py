"""Ed25519 signature verification for the agent, through the OpenSSL the Python process already has loaded.

The agent only ever verifies (the host signs, with ``cryptography``). Importing ``cryptography`` for that costs
the agent ~8 MB of resident memory (its Rust extension and OpenSSL bindings), a third of what the agent adds over
the model it serves; Python's own ``hashlib`` and ``ssl`` already link libcrypto, so the agent calls OpenSSL's
``EVP_DigestVerify`` on it through ``ctypes`` (OpenSSL >= 1.1.1: Ed25519 and one-shot verify). ``cryptography``
calls the same OpenSSL functions, so the verdicts are the same; where no usable libcrypto is found (another
platform, an OpenSSL too old) ``cryptography`` is the fallback.

Keys are 32 raw bytes, read from the PEM SubjectPublicKeyInfo the host writes (``pipeline.bundle.keys``).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: DER of SubjectPublicKeyInfo{AlgorithmIdentifier{id-Ed25519 (1.3.101.112)}, BIT STRING(32 bytes)} up to the key
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
PEM_BEGIN, PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
KEY_BYTES, SIGNATURE_BYTES = 32, 64
_NID_ED25519 = 1087  # EVP_PKEY_ED25519
_LIBCRYPTO = re.compile(r"libcrypto(\.so|-[0-9a-f]+\.so)")


class PublicKey:
    """An Ed25519 public key: ``verify(signature, message)`` is True or False, never raises on any bytes."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {KEY_BYTES} bytes")
        self.raw = raw

    @classmethod
    def from_pem(cls, data: bytes | str) -> "PublicKey":
        """The key in a ``-----BEGIN PUBLIC KEY-----`` block; ValueError for anything else (another algorithm,
        a private key, garbage)."""
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
        begin, end = text.find(PEM_BEGIN), text.find(PEM_END)
        if begin < 0 or end < begin:
            raise ValueError("not a PEM public key (no BEGIN/END PUBLIC KEY block)")
        try:
            der = base64.b64decode("".join(text[begin + len(PEM_BEGIN):end].split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the PEM block is not base64") from None
        if len(der) != len(SPKI_PREFIX) + KEY_BYTES or not der.startswith(SPKI_PREFIX):
            raise ValueError("not an Ed25519 public key (another algorithm, or a malformed key)")
        return cls(der[len(SPKI_PREFIX):])

    @classmethod
    def of(cls, key: object) -> "PublicKey":
        """``key`` as a PublicKey: one already, or a ``cryptography`` Ed25519 public key (the host's)."""
        if isinstance(key, PublicKey):
            return key
        raw = getattr(key, "public_bytes_raw", None)
        if raw is None:
            raise TypeError(f"not an Ed25519 public key: {type(key).__name__}")
        return cls(raw())

    @classmethod
    def load(cls, path: str | Path) -> "PublicKey":
        return cls.from_pem(Path(path).read_bytes())

    def keyid(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES or not isinstance(message, bytes):
            return False
        return _backend().verify(self.raw, signature, message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.keyid()})"


class LibCrypto:
    """OpenSSL's EVP one-shot verify through ctypes, on a libcrypto that has it."""

    name = "openssl"

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        self._new_key = lib.EVP_PKEY_new_raw_public_key
        self._new_key.argtypes, self._new_key.restype = [ctypes.c_int, vp, cp, sz], vp
        self._free_key = lib.EVP_PKEY_free
        self._free_key.argtypes, self._free_key.restype = [vp], None
        self._new_ctx = lib.EVP_MD_CTX_new
        self._new_ctx.argtypes, self._new_ctx.restype = [], vp
        self._free_ctx = lib.EVP_MD_CTX_free
        self._free_ctx.argtypes, self._free_ctx.restype = [vp], None
        self._init = lib.EVP_DigestVerifyInit
        self._init.argtypes, self._init.restype = [vp, vp, vp, vp, vp], ctypes.c_int
        self._verify = lib.EVP_DigestVerify
        self._verify.argtypes, self._verify.restype = [vp, cp, sz, cp, sz], ctypes.c_int
        self._clear = lib.ERR_clear_error
        self._clear.argtypes, self._clear.restype = [], None

    def verify(self, raw: bytes, signature: bytes, message: bytes) -> bool:
        key = self._new_key(_NID_ED25519, None, raw, len(raw))
        if not key:
            self._clear()
            return False
        ctx = self._new_ctx()
        try:
            if not ctx or self._init(ctx, None, None, None, key) != 1:
                return False
            return self._verify(ctx, signature, len(signature), message, len(message)) == 1
        finally:
            if ctx:
                self._free_ctx(ctx)
            self._free_key(key)
            self._clear()  # a failed verify leaves errors on this thread's OpenSSL queue


class Cryptography:
    """The ``cryptography`` package, where no libcrypto of our own can be used."""

    name = "cryptography"

    def __init__(self) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._key, self._invalid = Ed25519PublicKey.from_public_bytes, InvalidSignature

    def verify(self, raw: bytes, signature: bytes, message: bytes) -> bool:
        try:
            self._key(raw).verify(signature, message)
            return True
        except (self._invalid, ValueError):
            return False


def _loaded_libcrypto() -> str | None:
    """The libcrypto this process already mapped (hashlib's), so no second OpenSSL is loaded."""
    import _hashlib  # noqa: F401 - maps libcrypto where Python links it

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = "/" + line.rstrip("\n").partition("/")[2]
                name = path.rsplit("/", 1)[-1]
                # libcrypto.so.3, or a wheel's libcrypto-<hash>.so; not libcryptopp; not a file replaced on disk
                if _LIBCRYPTO.match(name) and not path.endswith(" (deleted)") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


def open_libcrypto(path: str | None = None) -> LibCrypto | None:
    """A LibCrypto on ``path`` (default: the process's own libcrypto), or None where it cannot verify Ed25519."""
    try:
        path = path or _loaded_libcrypto()
        if path is None:
            return None
        backend = LibCrypto(ctypes.CDLL(path))
    except (OSError, AttributeError, ImportError) as exc:  # no such library, or one without these symbols
        log.debug("libcrypto for Ed25519 unavailable: %s", exc)
        return None
    return backend if _selftest(backend) else None


# RFC 8032, section 7.1, TEST 2: the one-byte message 0x72
_TEST_KEY = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_TEST_SIG = bytes.fromhex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
                          "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def _selftest(backend) -> bool:
    return backend.verify(_TEST_KEY, _TEST_SIG, b"\x72") and not backend.verify(_TEST_KEY, _TEST_SIG, b"\x73")


_chosen = None
_lock = threading.Lock()


def _backend():
    global _chosen
    if _chosen is None:
        with _lock:
            if _chosen is None:
                _chosen = open_libcrypto() or Cryptography()
                log.debug("Ed25519 verification through %s", _chosen.name)
    return _chosen


def backend_name() -> str:
    return _backend().name
