"""Signed manifests: the metadata that travels ahead of a model and proves where it came from.

A manifest is a TUF-style envelope ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``;
the Ed25519 signature covers the canonical JSON bytes of ``signed``. The artifact itself is
bound to the manifest by its length and sha256.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ProtocolError, VerificationError
from .protocol import ResultCode

MANIFEST_TYPE = "edgefleet.manifest"
ENCODINGS = ("identity", "zlib")
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- tensors

def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_tensor(obj: dict[str, Any], what: str) -> np.ndarray:
    try:
        dtype = np.dtype(obj["dtype"])
        shape = tuple(int(s) for s in obj["shape"])
        raw = base64.b64decode(obj["data"], validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}: not a tensor {{dtype, shape, data}} ({exc})") from None


# --------------------------------------------------------------------------- keys

def keyid(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"trusted key {path}: cannot load ({exc})", ResultCode.UPDATE_FAILED) from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError(f"trusted key {path}: not an Ed25519 public key", ResultCode.UPDATE_FAILED)
    return key


def canonical_bytes(signed: dict[str, Any]) -> bytes:
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_envelope(signed: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    sig = private_key.sign(canonical_bytes(signed))
    return {
        "signed": signed,
        "signatures": [{"keyid": keyid(private_key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }


def verify_envelope(envelope: dict[str, Any], trusted: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Return the signed body when one signature verifies with a trusted key."""
    signed = envelope.get("signed")
    signatures = envelope.get("signatures")
    if not isinstance(signed, dict) or not isinstance(signatures, list) or not signatures:
        raise VerificationError("manifest: expected {signed, signatures[]} envelope", ResultCode.INTEGRITY_FAILURE)
    body = canonical_bytes(signed)
    seen = []
    for entry in signatures:
        kid = entry.get("keyid") if isinstance(entry, dict) else None
        seen.append(kid)
        key = trusted.get(kid) if isinstance(kid, str) else None
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(entry.get("sig", ""), validate=True), body)
            return signed
        except (InvalidSignature, ValueError):
            raise VerificationError(
                f"manifest: signature by key {kid} does not verify; the manifest was altered or signed "
                "by another key", ResultCode.INTEGRITY_FAILURE,
            ) from None
    raise VerificationError(
        f"manifest: signed by {seen}, none of which this device trusts ({sorted(trusted)}); "
        "install the host's public key in the agent's trusted_keys", ResultCode.INTEGRITY_FAILURE,
    )


# --------------------------------------------------------------------------- the signed body

@dataclass(frozen=True)
class Manifest:
    """The typed view of a verified manifest body."""

    name: str
    version: int
    target: str
    created: str
    expires: str | None
    runtime: str
    filename: str
    length: int  # of the payload on the wire
    sha256: str
    chunk_size: int
    chunks: int
    io: dict[str, Any]
    golden: dict[str, Any]
    health: dict[str, Any]
    budgets: dict[str, Any]
    predicted: dict[str, Any]
    encoding: str = "identity"  # or "zlib": the payload is the model file deflated
    raw_length: int = 0  # of the model file once decoded
    raw_sha256: str = ""
    url: str | None = None  # optional HTTP(S) source of the payload, fetched with Range requests

    @classmethod
    def from_signed(cls, signed: dict[str, Any]) -> "Manifest":
        if signed.get("type") != MANIFEST_TYPE or signed.get("manifest_version") != MANIFEST_VERSION:
            raise ProtocolError(
                f"manifest: type {signed.get('type')!r} v{signed.get('manifest_version')!r}, "
                f"expected {MANIFEST_TYPE!r} v{MANIFEST_VERSION}"
            )
        try:
            art = signed["artifact"]
            m = cls(
                name=str(signed["name"]), version=int(signed["version"]), target=str(signed["target"]),
                created=str(signed["created"]), expires=signed.get("expires"), runtime=str(signed["runtime"]),
                filename=str(art["filename"]), length=int(art["length"]), sha256=str(art["sha256"]),
                chunk_size=int(art["chunk_size"]), chunks=int(art["chunks"]),
                io=dict(signed["io"]), golden=dict(signed["golden"]), health=dict(signed.get("health", {})),
                budgets=dict(signed.get("budgets", {})), predicted=dict(signed.get("predicted", {})),
                encoding=str(art.get("encoding", "identity")), raw_length=int(art.get("raw_length", art["length"])),
                raw_sha256=str(art.get("raw_sha256", art["sha256"])), url=art.get("url"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"manifest: missing or bad field ({exc!r})") from None
        if m.chunk_size <= 0 or m.chunks != -(-m.length // m.chunk_size) or m.length <= 0:
            raise ProtocolError(f"manifest: length {m.length} / chunk_size {m.chunk_size} / chunks {m.chunks} disagree")
        if m.url is not None and not str(m.url).startswith(("http://", "https://")):
            raise ProtocolError(f"manifest: url {m.url!r} must be http:// or https://")
        if m.encoding not in ENCODINGS:
            raise ProtocolError(f"manifest: encoding {m.encoding!r} unknown; this agent reads {list(ENCODINGS)}")
        if "/" in m.filename or m.filename.startswith("."):
            raise ProtocolError(f"manifest: filename {m.filename!r} must be a plain file name")
        return m

    def check_expiry(self, at: dt.datetime | None = None) -> None:
        if self.expires is None:
            return
        at = at or dt.datetime.now(dt.timezone.utc)
        if dt.datetime.fromisoformat(self.expires) < at:
            raise VerificationError(
                f"manifest v{self.version} expired at {self.expires}; re-sign it on the host",
                ResultCode.UPDATE_FAILED,
            )

    def golden_pairs(self) -> list[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
        pairs = []
        for i, case in enumerate(self.golden.get("cases", [])):
            inputs = {k: decode_tensor(v, f"golden case {i} input {k}") for k, v in case["inputs"].items()}
            outputs = [decode_tensor(v, f"golden case {i} output {j}") for j, v in enumerate(case["outputs"])]
            pairs.append((inputs, outputs))
        return pairs


def decode_payload(src: Path, dst: Path, manifest: Manifest, block: int = 1 << 16) -> None:
    """Decode a verified payload into the model file, streaming (bounded memory), refusing anything that
    decodes to more than ``raw_length`` bytes (a decompression bomb) or to the wrong hash."""
    if manifest.encoding == "identity":
        src.replace(dst)
        return
    inflater = zlib.decompressobj()
    h, written = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(block), b""):
            out = inflater.decompress(chunk, manifest.raw_length + 1 - written)
            written += len(out)
            if written > manifest.raw_length or inflater.unconsumed_tail:
                raise VerificationError(f"payload decodes to more than raw_length {manifest.raw_length} bytes",
                                        ResultCode.INTEGRITY_FAILURE)
            h.update(out)
            fout.write(out)
        tail = inflater.flush()
        written += len(tail)
        h.update(tail)
        fout.write(tail)
        fout.flush()
        os.fsync(fout.fileno())
    if written != manifest.raw_length or h.hexdigest() != manifest.raw_sha256:
        raise VerificationError(f"decoded model: {written} bytes, sha256 {h.hexdigest()[:16]}…; manifest says "
                                f"{manifest.raw_length} bytes, {manifest.raw_sha256[:16]}…", ResultCode.INTEGRITY_FAILURE)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
