"""The model to compress: from its checkpoint, or trained once on the configured data and cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import CompressView
from ..data import Dataset
from . import build_model, load_checkpoint
from .training import train
from ..ui import UI


def cache_path(view: CompressView) -> Path:
    key = json.dumps({"model": view.model.model_dump(mode="json", exclude={"checkpoint", "file"}),
                      "data": view.data.model_dump(mode="json"), "torch": torch.__version__.split("+")[0]},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return view.workdir / "cache" / f"{view.model.zoo or 'factory'}-{view.data.name}-{digest}.pt"


def pretrained(view: CompressView, data: Dataset, ui: UI) -> tuple[nn.Module, dict]:
    torch.manual_seed(view.model.train.seed)
    model = build_model(view.model, data.input_shape, data.num_classes)
    if view.model.checkpoint is not None:
        path = view.resolve(view.model.checkpoint)
        ui.info(f"checkpoint {path}")
        return load_checkpoint(model, path), {"source": "checkpoint", "path": str(path)}
    path = cache_path(view)
    if path.exists():
        ui.info(f"cached trained model {path.name} (delete it to retrain)")
        return load_checkpoint(model, path), {"source": "cache", "path": str(path)}
    t = view.model.train
    ui.info(f"training {view.model.zoo or view.model.factory} on {data.name} ({len(data.x_train)} images), "
            f"{t.epochs} epochs")
    stats = train(model, data, t.epochs, t.lr, t.batch_size, t.seed,
                  progress=lambda e, n, loss: ui.info(f"epoch {e}/{n}: loss {loss:.4f}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, {"source": "trained", "path": str(path), "wall_s": round(stats["wall_s"], 2)}
