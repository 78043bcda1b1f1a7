"""The model to compress: from its checkpoint, or trained once on the configured data and cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import DeployConfig
from ..data import Dataset
from . import build_model, load_checkpoint
from .training import train
from ..ui import UI


def cache_path(cfg: DeployConfig) -> Path:
    key = json.dumps({"model": cfg.model.model_dump(mode="json", exclude={"checkpoint"}),
                      "data": cfg.data.model_dump(mode="json"), "torch": torch.__version__.split("+")[0]},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cfg.resolve(cfg.workdir) / "cache" / f"{cfg.model.zoo or 'factory'}-{cfg.data.name}-{digest}.pt"


def pretrained(cfg: DeployConfig, data: Dataset, ui: UI) -> tuple[nn.Module, dict]:
    torch.manual_seed(cfg.model.train.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    if cfg.model.checkpoint is not None:
        path = cfg.resolve(cfg.model.checkpoint)
        ui.info(f"checkpoint {path}")
        return load_checkpoint(model, path), {"source": "checkpoint", "path": str(path)}
    path = cache_path(cfg)
    if path.exists():
        ui.info(f"cached trained model {path.name} (delete it to retrain)")
        return load_checkpoint(model, path), {"source": "cache", "path": str(path)}
    t = cfg.model.train
    ui.info(f"training {cfg.model.zoo or cfg.model.factory} on {data.name} ({len(data.x_train)} images), "
            f"{t.epochs} epochs")
    stats = train(model, data, t.epochs, t.lr, t.batch_size, t.seed,
                  progress=lambda e, n, loss: ui.info(f"epoch {e}/{n}: loss {loss:.4f}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, {"source": "trained", "path": str(path), "wall_s": round(stats["wall_s"], 2)}
