"""The compressed model, cached: a deploy with nothing changed reuses it instead of pruning and fine-tuning again.

The key is a SHA-256 over everything that determines the result:
- the dense model's weights as compression starts (so the checkpoint's bytes, or the cached/trained model),
  and the source files of the model's own classes (zoo or factory), its config (zoo/factory, options, train);
- the data: its spec in deploy.yaml and the arrays themselves (a changed .npz file changes the key);
- the recipe (every step with its parameters) and the fine-tuning settings (seeds included);
- the code that compresses (``pipeline/compress/``, this module among it, and ``pipeline/models/training.py``) and the
  versions of torch, torch-pruning and numpy, and whether training runs on CUDA.

An entry is ``WORKDIR/cache/compress/<key>/`` holding ``model.pt`` (the whole module: structured pruning changes
its shapes) and ``meta.json`` (the step reports and summary). It is written into a temporary directory and
renamed into place, so a reader sees a whole entry or none; the newest ``KEEP`` entries stay. ``model.pt`` is a
pickle that is loaded as code: the cache trusts its own state directory as it trusts ``.venv``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import CompressStep, CompressView
from ..data import Dataset

log = logging.getLogger(__name__)

#: bump when what an entry holds changes
CACHE_FORMAT = 1
KEEP = 8
_PKG = Path(__file__).resolve().parent.parent
_CODE = [_PKG / "compress", _PKG / "models" / "training.py"]


def cache_dir(view: CompressView) -> Path:
    return view.workdir / "cache" / "compress"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _files_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def code_version() -> str:
    """A digest of the code that compresses: a change to it is a new key."""
    return _files_digest(_CODE)[:16]


def _model_sources(model: nn.Module) -> str:
    """The source files of the model's own module classes (not torch's): the zoo, or the user's factory module."""
    files = set()
    for m in model.modules():
        mod = type(m).__module__
        if mod.split(".")[0] == "torch":
            continue
        try:
            files.add(Path(inspect.getsourcefile(type(m)) or ""))
        except (TypeError, OSError):
            files.add(Path(mod))
    return _files_digest([f for f in files if f.is_file()]) + "|" + ",".join(sorted(str(f) for f in files))


def _update_tensor(h, name: str, t: torch.Tensor | np.ndarray) -> None:
    a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    h.update(f"{name}|{a.dtype}|{a.shape}\0".encode())
    h.update(a.tobytes())


def cache_key(view: CompressView, steps: list[CompressStep], dense: nn.Module, data: Dataset) -> str:
    spec = {
        "format": CACHE_FORMAT,
        "code": code_version(),
        "versions": {"torch": torch.__version__, "torch-pruning": _version("torch-pruning"),
                     "numpy": np.__version__, "cuda": torch.cuda.is_available()},
        "model": view.model.model_dump(mode="json", exclude={"checkpoint", "file"}),
        "model_sources": _model_sources(dense),
        "data": view.data.model_dump(mode="json"),
        "steps": [s.model_dump(mode="json") for s in steps],
        "finetune": view.finetune.model_dump(mode="json"),
    }
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for name, t in sorted(dense.state_dict().items()):
        _update_tensor(h, f"dense.{name}", t)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        _update_tensor(h, f"data.{name}", getattr(data, name))
    h.update(str(data.num_classes).encode())
    return h.hexdigest()


def load(root: Path, key: str) -> tuple[nn.Module, dict[str, Any]] | None:
    """The cached module and its metadata, or None (absent, unreadable, or from another format)."""
    entry = root / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return None
        model = torch.load(entry / "model.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, never a failed deploy
        log.warning("compression cache entry %s unreadable (%s): compressing again", entry, exc)
        return None
    if not isinstance(model, nn.Module):
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)  # most recently used: kept longest
    return model.eval(), meta


def store(root: Path, key: str, model: nn.Module, meta: dict[str, Any]) -> Path | None:
    """Write an entry atomically (temporary directory, then one rename); None when it could not be written."""
    entry = root / key
    tmp = root / f".{key}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(model, tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": CACHE_FORMAT, "key": key,
                                                   "created": time.time()}, indent=2, default=str))
        if entry.exists():  # another run stored the same result meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return entry
        tmp.rename(entry)
    except Exception as exc:  # noqa: BLE001 - caching is an optimisation: the deploy goes on without it
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("compressed model not cached (%s)", exc)
        return None
    _evict(root)
    return entry


def _evict(root: Path, keep: int = KEEP) -> None:
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["cache_dir", "cache_key", "code_version", "load", "store"]
