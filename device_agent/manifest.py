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

from .delta import Delta, apply_delta
from .drift import Reference
from .ed25519 import PublicKey
from .errors import ProtocolError, VerificationError
from .preprocess import Preprocess
from .quality import Shadow
from .protocol import ResultCode, short

MANIFEST_TYPE = "edgefleet.manifest"
#: "delta": the payload is a patch against the model the device runs (the manifest's delta leaf, .delta)
ENCODINGS = ("identity", "zlib", "delta")
#: what an artifact is: a model to install in a slot and serve, or a calibration suite to time and report
#: (device_agent.calibration), never installed; absent means "model" (manifests before kinds existed)
KINDS = ("model", "calibration")
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- tensors

def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


#: the element types a model's inputs and outputs may have
TENSOR_DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                           "int64", "uint64", "bool"})


def decode_tensor(obj: Any, what: str) -> np.ndarray:
    """Total: a numeric array, or ProtocolError."""
    if not isinstance(obj, dict) or not isinstance(obj.get("dtype"), str) or obj["dtype"] not in TENSOR_DTYPES:
        raise ProtocolError(f"{what}: not a tensor {{dtype, shape, data}} with dtype one of {sorted(TENSOR_DTYPES)}")
    shape, data = obj.get("shape"), obj.get("data")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise ProtocolError(f"{what}: shape {short(shape)} is not a list of up to 8 non-negative integers")
    if not isinstance(data, str):
        raise ProtocolError(f"{what}: data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(shape)
    except ValueError as exc:  # binascii.Error is a ValueError; so is a size that does not fit the shape
        raise ProtocolError(f"{what}: not a tensor of shape {shape} ({short(str(exc))})") from None


# --------------------------------------------------------------------------- keys

def keyid(public_key: Any) -> str:
    """The id a signature names its key by: the first 16 hex digits of the raw key's sha256. Takes the agent's
    PublicKey or a ``cryptography`` Ed25519 key (the host's)."""
    return PublicKey.of(public_key).keyid()


def load_public_key(path: str | Path) -> PublicKey:
    try:
        return PublicKey.load(path)
    except OSError as exc:
        raise VerificationError(f"trusted key {path}: cannot load ({exc})", ResultCode.UPDATE_FAILED) from None
    except ValueError as exc:
        raise VerificationError(f"trusted key {path}: {exc}", ResultCode.UPDATE_FAILED) from None


def canonical_bytes(signed: dict[str, Any]) -> bytes:
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_envelope(signed: dict[str, Any], private_key: Any) -> dict[str, Any]:
    """The host's side: ``private_key`` is a ``cryptography`` Ed25519PrivateKey (the agent never signs)."""
    sig = private_key.sign(canonical_bytes(signed))
    return {
        "signed": signed,
        "signatures": [{"keyid": keyid(private_key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }


def verify_envelope(envelope: Any, trusted: dict[str, Any]) -> dict[str, Any]:
    """Return the signed body when one signature verifies with a trusted key (a PublicKey, or the host's
    ``cryptography`` key). Total: any value gives the signed body or VerificationError."""
    signed = envelope.get("signed") if isinstance(envelope, dict) else None
    signatures = envelope.get("signatures") if isinstance(envelope, dict) else None
    if not isinstance(signed, dict) or not isinstance(signatures, list) or not 0 < len(signatures) <= 8:
        raise VerificationError("manifest: expected a {signed, signatures[1-8]} envelope",
                                ResultCode.INTEGRITY_FAILURE)
    try:
        body = canonical_bytes(signed)
    except (UnicodeError, ValueError, TypeError, RecursionError):
        raise VerificationError("manifest: the signed body is not canonical JSON", ResultCode.INTEGRITY_FAILURE) \
            from None
    seen = []
    for entry in signatures:
        kid = entry.get("keyid") if isinstance(entry, dict) else None
        seen.append(short(kid, 24))
        key = trusted.get(kid) if isinstance(kid, str) else None
        if key is None:
            continue
        key = PublicKey.of(key)
        sig = entry.get("sig")
        try:
            if not isinstance(sig, str) or len(sig) > 128:
                raise ValueError("not a base64 Ed25519 signature")
            if not key.verify(base64.b64decode(sig, validate=True), body):
                raise ValueError("the signature does not verify")
            return signed
        except ValueError:
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
    encoding: str = "identity"  # or "zlib": the payload is the model file deflated; "delta": a patch (``delta``)
    raw_length: int = 0  # of the model file once decoded
    raw_sha256: str = ""
    url: str | None = None  # optional HTTP(S) source of the payload, fetched with Range requests
    preprocess: Preprocess | None = None  # how the inputs are prepared from an image (device_agent.preprocess)
    labels: tuple[str, ...] | None = None  # the first output's class names, index by index, where the data has them
    kind: str = "model"  # one of KINDS
    reference: Reference | None = None  # the drift reference statistics of the model's data (device_agent.drift)
    shadow: Shadow | None = None  # a candidate to shadow beside the active model, not to activate (.quality)
    delta: Delta | None = None  # the payload is a patch against this base model (device_agent.delta)

    @classmethod
    def from_signed(cls, signed: Any) -> "Manifest":
        """The typed view of a signed body. Total: any value gives a Manifest or ProtocolError."""
        if not isinstance(signed, dict):
            raise ProtocolError(f"manifest: the signed body is a {type(signed).__name__}, not an object")
        if signed.get("type") != MANIFEST_TYPE or signed.get("manifest_version") != MANIFEST_VERSION:
            raise ProtocolError(
                f"manifest: type {short(signed.get('type'))} v{short(signed.get('manifest_version'))}, "
                f"expected {MANIFEST_TYPE!r} v{MANIFEST_VERSION}"
            )
        art = _field(signed, "artifact", dict)
        length = _count(art, "length", 1)
        m = cls(
            name=_field(signed, "name", str), version=_count(signed, "version", 1),
            target=_field(signed, "target", str), created=_field(signed, "created", str),
            expires=_field(signed, "expires", str, optional=True), runtime=_field(signed, "runtime", str),
            filename=_field(art, "filename", str), length=length, sha256=_field(art, "sha256", str),
            chunk_size=_count(art, "chunk_size", 1), chunks=_count(art, "chunks", 1),
            io=_field(signed, "io", dict), golden=_field(signed, "golden", dict),
            health=_field(signed, "health", dict, optional=True) or {},
            budgets=_field(signed, "budgets", dict, optional=True) or {},
            predicted=_field(signed, "predicted", dict, optional=True) or {},
            encoding=_field(art, "encoding", str, optional=True) or "identity",
            raw_length=_count(art, "raw_length", 1) if art.get("raw_length") is not None else length,
            raw_sha256=_field(art, "raw_sha256", str, optional=True) or _field(art, "sha256", str),
            url=_field(art, "url", str, optional=True),
            preprocess=None if signed.get("preprocess") is None
            else Preprocess.from_dict(signed["preprocess"], "manifest: preprocess"),
            labels=_labels(signed.get("labels")),
            kind=_field(signed, "kind", str, optional=True) or "model",
            reference=None if signed.get("reference") is None
            else Reference.from_dict(signed["reference"], "manifest: reference"),
            shadow=None if signed.get("shadow") is None else Shadow.from_dict(signed["shadow"]),
            delta=None if signed.get("delta") is None else Delta.from_dict(signed["delta"]),
        )
        if m.expires is not None:
            _timestamp(m.expires, "expires")
        if m.chunk_size <= 0 or m.chunks != -(-m.length // m.chunk_size) or m.length <= 0:
            raise ProtocolError(f"manifest: length {m.length} / chunk_size {m.chunk_size} / chunks {m.chunks} disagree")
        if m.url is not None and not str(m.url).startswith(("http://", "https://")):
            raise ProtocolError(f"manifest: url {m.url!r} must be http:// or https://")
        if m.encoding not in ENCODINGS:
            raise ProtocolError(f"manifest: encoding {m.encoding!r} unknown; this agent reads {list(ENCODINGS)}")
        if "/" in m.filename or m.filename.startswith("."):
            raise ProtocolError(f"manifest: filename {m.filename!r} must be a plain file name")
        _check_labels_fit(m.labels, m.io)
        if m.reference is not None:
            m.reference.check_io(m.io)
        if m.kind not in KINDS:
            raise ProtocolError(f"manifest: kind {short(m.kind)} unknown; this agent reads {list(KINDS)}")
        if m.shadow is not None and m.kind != "model":
            raise ProtocolError(f"manifest: a {m.kind} is not a model to shadow")
        if (m.encoding == "delta") != (m.delta is not None):
            raise ProtocolError(f"manifest: encoding {m.encoding!r} with{'out' if m.delta is None else ''} a delta "
                                "leaf; a patch is encoding 'delta' with its delta leaf, and only that")
        if m.delta is not None and (m.kind != "model" or m.delta.base_version >= m.version):
            raise ProtocolError(f"manifest: a delta of a {m.kind} v{m.version} against v{m.delta.base_version}; "
                                "a delta rebuilds a model from an older version")
        return m

    def to_signed(self) -> dict[str, Any]:
        """The body to sign: the inverse of ``from_signed`` (``Manifest.from_signed(m.to_signed()) == m``)."""
        artifact: dict[str, Any] = {
            "filename": self.filename, "length": self.length, "sha256": self.sha256, "chunk_size": self.chunk_size,
            "chunks": self.chunks, "encoding": self.encoding, "raw_length": self.raw_length or self.length,
            "raw_sha256": self.raw_sha256 or self.sha256,
        }
        if self.url is not None:
            artifact["url"] = self.url
        body = {
            "type": MANIFEST_TYPE, "manifest_version": MANIFEST_VERSION, "name": self.name, "version": self.version,
            "target": self.target, "runtime": self.runtime, "created": self.created, "expires": self.expires,
            "artifact": artifact, "io": self.io, "golden": self.golden, "health": self.health,
            "budgets": self.budgets, "predicted": self.predicted,
        }
        if self.preprocess is not None:  # absent, not null, without one: older manifests stay byte for byte
            body["preprocess"] = self.preprocess.to_dict()
        if self.labels is not None:
            body["labels"] = list(self.labels)
        if self.kind != "model":  # absent for a model: older manifests stay byte for byte
            body["kind"] = self.kind
        if self.reference is not None:  # absent without one, as preprocess and labels
            body["reference"] = self.reference.to_dict()
        if self.shadow is not None:
            body["shadow"] = self.shadow.to_dict()
        if self.delta is not None:  # absent for a full artifact, as shadow
            body["delta"] = self.delta.to_dict()
        return json.loads(json.dumps(body))  # plain JSON values: exactly what a receiver parses and re-serialises

    def check_expiry(self, at: dt.datetime | None = None) -> None:
        if self.expires is None:
            return
        at = at or dt.datetime.now(dt.timezone.utc)
        if _timestamp(self.expires, "expires") < at:
            raise VerificationError(
                f"manifest v{self.version} expired at {self.expires}; re-sign it on the host",
                ResultCode.UPDATE_FAILED,
            )

    def golden_pairs(self) -> list[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
        """Total: the golden cases, or ProtocolError naming the first one that is not {inputs{}, outputs[]}."""
        cases = self.golden.get("cases", [])
        if not isinstance(cases, list):
            raise ProtocolError("manifest: golden.cases must be a list")
        pairs = []
        for i, case in enumerate(cases):
            if not isinstance(case, dict) or not isinstance(case.get("inputs"), dict) \
                    or not isinstance(case.get("outputs"), list):
                raise ProtocolError(f"manifest: golden case {i} is not {{inputs: {{name: tensor}}, outputs: [tensor]}}")
            inputs = {str(k): decode_tensor(v, f"golden case {i} input {short(k)}") for k, v in case["inputs"].items()}
            outputs = [decode_tensor(v, f"golden case {i} output {j}") for j, v in enumerate(case["outputs"])]
            pairs.append((inputs, outputs))
        return pairs


def _field(body: dict[str, Any], key: str, kind: type, optional: bool = False) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"manifest: missing or bad field {key!r}: must be {'null or ' if optional else ''}{kind.__name__}, "
                            f"got {short(value, 60)}")
    return value


#: bounds on ``labels``: a class count no classifier reaches, a name an application can show
MAX_LABELS, MAX_LABEL_CHARS = 100_000, 200


def _labels(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_LABELS:
        raise ProtocolError(f"manifest: labels must be a list of 1 to {MAX_LABELS} names, got {short(value, 60)}")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_LABEL_CHARS or not _utf8(name):
            raise ProtocolError(f"manifest: labels[{i}] must be a name of 1 to {MAX_LABEL_CHARS} characters of "
                                f"UTF-8, got {short(name, 60)}")
    if len(set(value)) != len(value):
        raise ProtocolError("manifest: labels name a class twice")
    return tuple(value)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: how Python reads a file name that is not UTF-8
        return False
    return True


def _check_labels_fit(labels: tuple[str, ...] | None, io: dict[str, Any]) -> None:
    """The labels name one axis of the first output after its batch axis (a classifier's [1, 10], a convolutional
    head's [1, 10, 1, 1], a segmenter's [1, 21, H, W]), when the manifest gives the shape in numbers."""
    if labels is None:
        return
    outputs = io.get("outputs")
    shape = outputs[0].get("shape") if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict) else None
    if not isinstance(shape, list) or len(shape) < 2:
        return
    axes = shape[1:]
    if all(isinstance(d, int) and not isinstance(d, bool) for d in axes) and len(labels) not in axes:
        raise ProtocolError(f"manifest: {len(labels)} labels for an output of shape {shape}: no axis after the "
                            "batch has that many entries")


def _count(body: dict[str, Any], key: str, least: int) -> int:
    """A positive integer that fits the device's arithmetic (no floats, no booleans, below 2**53)."""
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value < 2**53:
        raise ProtocolError(f"manifest: missing or bad field {key!r}: must be an integer in [{least}, 2**53), "
                            f"got {short(value, 60)}")
    return value


def _timestamp(text: str, what: str) -> dt.datetime:
    """An ISO 8601 time; one without a zone is UTC (what the host writes)."""
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ProtocolError(f"manifest: {what} {short(text, 60)} is not an ISO 8601 timestamp") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


def decode_payload(src: Path, dst: Path, manifest: Manifest, block: int = 1 << 16, base: Path | None = None) -> None:
    """Decode a verified payload into the model file, streaming (bounded memory), refusing anything that
    decodes to more than ``raw_length`` bytes (a decompression bomb) or to the wrong hash. A delta is applied
    against ``base``, the model the device runs (device_agent.delta: a DeltaError, a VerificationError, refuses it)."""
    if manifest.delta is not None:
        return apply_delta(src, base, dst, manifest.delta, manifest.raw_length, manifest.raw_sha256)
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
