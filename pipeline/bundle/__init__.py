"""Bundle a model into a signed artifact: manifest (golden vectors, budgets, predictions) + model + signature."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.drift import Reference
from device_agent.errors import ProtocolError
from device_agent.manifest import Manifest, sign_envelope
from device_agent.preprocess import Preprocess
from device_agent.protocol import DEFAULT_CHUNK_SIZE
from device_agent.quality import Shadow
from device_agent.storage import atomic_write_bytes, atomic_write_json, read_json

from ..errors import ExportError
from .golden import golden_section, reference_session
from .keys import load_or_create, public_key_path

__all__ = ["Artifact", "build_artifact", "golden_section", "load_or_create", "next_version", "public_key_path",
           "shadow_artifact"]


@dataclass(frozen=True)
class Artifact:
    dir: Path
    model_path: Path
    envelope: dict[str, Any]
    manifest: Manifest

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    @property
    def size_bytes(self) -> int:
        return self.manifest.length

    @property
    def version(self) -> int:
        return self.manifest.version

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": m.name, "version": self.version, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "encoding": m.encoding, "model_bytes": m.raw_length, "model_sha256": m.raw_sha256,
                "chunks": m.chunks, "path": str(self.dir)}


def next_version(state_dir: Path) -> int:
    """Monotonic per host: wall-clock seconds, never below the last issued version + 1."""
    path = state_dir / "last_version.json"
    last = int(read_json(path, {"version": 0})["version"])
    version = max(int(time.time()), last + 1)
    atomic_write_json(path, {"version": version})
    return version


def build_artifact(
    model_path: Path, out_root: Path, *, name: str, version: int, target: str, runtime: str,
    golden_inputs: np.ndarray | None, budgets: dict[str, Any], predicted: dict[str, Any], health: dict[str, Any],
    key_dir: Path, expires_days: float | None = 30, chunk_size: int = DEFAULT_CHUNK_SIZE,
    url_base: str | None = None, preprocess: Preprocess | None = None, labels: tuple[str, ...] | None = None,
    kind: str = "model", reference: Reference | None = None,
) -> Artifact:
    """``url_base``: where the artifact directory will be served over HTTP(S); its payload's URL is then
    signed into the manifest and devices fetch it with Range requests instead of MQTT chunks. ``preprocess``:
    how the inputs (the golden ones included) were prepared from an image, signed in for the device's application;
    ``labels``: the class names of the first output, index by index; ``reference``: the drift reference statistics
    of the model's data (:func:`pipeline.bundle.drift.drift_reference`). ``kind``: ``model``, or ``calibration`` for a
    calibration suite (a zip, see device_agent.calibration): never installed, so it has no io and no golden
    vectors (``golden_inputs`` is ignored)."""
    from device_agent.runtimes import get_runtime

    key = load_or_create(key_dir)
    raw = model_path.read_bytes()
    data, encoding = encode_payload(raw)
    if kind == "model":
        rt = get_runtime(runtime)
        sess = reference_session(rt, model_path)  # the agent's own runtime reads the model as the device will
        io = {"inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in sess.inputs],
              "outputs": [{"name": o.name, "shape": list(o.shape), "dtype": o.dtype} for o in sess.outputs]}
        golden = golden_section(rt, model_path, golden_inputs)  # what the target computes, and its tolerance
    else:
        io, golden = {}, {}
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    out = out_root / f"{name}-{target}-v{version}"
    manifest = Manifest(
        name=name, version=version, target=target, runtime=runtime, created=now.isoformat(),
        expires=(now + dt.timedelta(days=expires_days)).isoformat() if expires_days else None,
        filename=model_path.name, length=len(data), sha256=hashlib.sha256(data).hexdigest(), chunk_size=chunk_size,
        chunks=-(-len(data) // chunk_size), encoding=encoding, raw_length=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        url=f"{url_base.rstrip('/')}/{out.name}/{payload_name(model_path.name, encoding)}" if url_base else None,
        io=io, golden=golden, health=health, budgets=budgets, predicted=predicted, preprocess=preprocess,
        labels=tuple(labels) if labels is not None else None, kind=kind, reference=reference,
    )
    envelope, checked = _sign(manifest, key, out.name)
    return write_artifact(out, data, envelope, checked, key_dir)


def write_artifact(out: Path, data: bytes, envelope: dict[str, Any], manifest: Manifest, key_dir: Path) -> Artifact:
    """The artifact directory ``out``: the payload ``data``, the signed ``envelope`` of ``manifest``, the public key.
    Also how a delta against an earlier model is stored (pipeline.bundle.delta)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_bytes(tmp / payload_name(manifest.filename, manifest.encoding), data)
    atomic_write_json(tmp / "manifest.json", envelope)
    shutil.copy(public_key_path(key_dir), tmp / "signing.pub")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a reader sees the whole artifact or none of it
    return Artifact(out, out / payload_name(manifest.filename, manifest.encoding), envelope, manifest)


def shadow_artifact(artifact: Artifact, shadow: Shadow, key_dir: Path) -> Artifact:
    """``artifact``'s manifest with the ``shadow`` leaf, signed as a second envelope over the same payload: the job
    that has a device install the candidate beside its active model and shadow it there, never activate it
    (device_agent.quality). The payload, its sha256 and the artifact's files are those of ``artifact``; the normal
    envelope (``manifest.json``) stays what promotes it."""
    if artifact.manifest.kind != "model":
        raise ExportError(f"bundle {artifact.dir.name}: a {artifact.manifest.kind} is not a model to shadow")
    manifest = dataclasses.replace(artifact.manifest, shadow=shadow)
    envelope, checked = _sign(manifest, load_or_create(key_dir), f"{artifact.dir.name} (shadow)")
    return Artifact(artifact.dir, artifact.model_path, envelope, checked)


def _sign(manifest: Manifest, key: Any, what: str) -> tuple[dict[str, Any], Manifest]:
    """The signed envelope of ``manifest`` and the manifest as the device will read it: the device's own schema
    builds what it will parse, and checks it as the device will, before anything is signed."""
    signed = manifest.to_signed()
    try:
        checked = Manifest.from_signed(signed)
    except ProtocolError as exc:
        raise ExportError(f"bundle {what}: the device would refuse this manifest: {exc}") from None
    return sign_envelope(signed, key), checked


def payload_name(filename: str, encoding: str) -> str:
    return filename + {"zlib": ".z", "delta": ".delta"}.get(encoding, "")


def encode_payload(raw: bytes, min_gain: float = 0.1) -> tuple[bytes, str]:
    """Deflate the model when that saves at least ``min_gain`` of its size: pruned weights are runs of
    zeros, so an unstructured-pruned model's artifact shrinks with its sparsity."""
    packed = zlib.compress(raw, 9)
    return (packed, "zlib") if len(packed) <= (1 - min_gain) * len(raw) else (raw, "identity")


def load_artifact(directory: Path) -> Artifact:
    envelope = json.loads((directory / "manifest.json").read_text())
    manifest = Manifest.from_signed(envelope["signed"])
    return Artifact(directory, directory / payload_name(manifest.filename, manifest.encoding), envelope, manifest)
