"""``pipeline compress``: the compression stage on its own, writing a checkpoint, ONNX files and a report.

The output directory is replaced atomically: an interrupted run leaves the previous output intact.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import inputs
from . import cache as compress_cache
from . import CompressContext, StepReport, build_recipe, model_stats, run_recipe
from .base import thinness
from .structured import count_macs
from ..config import CompressStep, CompressView
from ..data import Dataset
from ..models.pretrained import pretrained
from ..models.training import evaluate
from ..ui import UI


@dataclass
class Compressed:
    dense: nn.Module
    model: nn.Module
    data: Dataset
    steps: list[StepReport]
    summary: dict[str, Any]


def load_data(view: CompressView) -> Dataset:
    """The configured dataset; a problem with the user's data file is a ConfigError naming deploy.yaml."""
    return inputs.load_data(view)


@dataclass
class Prepared:
    data: Dataset
    model: nn.Module  # the dense, trained model
    origin: dict[str, Any]


def prepare(view: CompressView, ui: UI) -> Prepared:
    """The data and the dense trained model; the user's files are checked first (exit 2, never a traceback)."""
    data = load_data(view)
    inputs.check_model(view, data)
    model, origin = pretrained(view, data, ui)
    return Prepared(data, model, origin)


def compress(view: CompressView, ui: UI, recipe: str | None = None, steps: list[CompressStep] | None = None,
             prepared: Prepared | None = None, cache: bool = False) -> Compressed:
    """Run a recipe (by name, or the given steps) on a copy of the dense model.

    With ``cache``, a result compressed before from the same inputs (see ``compress_cache``) is reused, and a
    new one is stored under WORKDIR/cache/compress/.
    """
    where = "compress" if recipe in (None, "default") else f"recipes.{recipe}"
    chosen = steps if steps is not None else view.recipe(recipe)
    methods = build_recipe(chosen, key=where)
    prepared = prepared or prepare(view, ui)
    data = prepared.data
    dense = prepared.model
    key = compress_cache.cache_key(view, chosen, dense, data) if cache else None
    if key is not None:
        hit = compress_cache.load(compress_cache.cache_dir(view), key)
        if hit is not None:
            model, meta = hit
            s = meta["summary"]
            ui.info(f"compress: reused cached model (key {key[:12]}; --no-cache to compress again): "
                    f"{s['nonzero_params']:,} of {s['params']:,} parameters nonzero, accuracy "
                    f"{s['accuracy_before']:.2%} -> {s['accuracy_after']:.2%}")
            summary = {**s, "origin": prepared.origin, "cache": {"key": key, "reused": True}}
            warn_if_thin(thinness(model), ui)
            return Compressed(dense, model, data, [StepReport(**r) for r in meta["steps"]], summary)
    model = copy.deepcopy(dense)
    before, acc_before = model_stats(model), evaluate(model, data.x_test, data.y_test)
    example = torch.zeros((1, *data.input_shape))
    macs_before = count_macs(model, example)[0]
    ui.info(f"dense: {before['params']:,} parameters, {macs_before:,} MACs, test accuracy {acc_before:.2%} "
            f"on {len(data.x_test)} images")
    t0 = time.perf_counter()
    ctx = CompressContext(data, view.model.train, view.finetune, progress=ui.info)
    reports = run_recipe(model, methods, ctx)
    after, acc_after = model_stats(model), evaluate(model, data.x_test, data.y_test)
    macs_after = count_macs(model, example)[0]
    ui.info(f"compressed: {after['nonzero_params']:,} of {after['params']:,} parameters nonzero "
            f"({after['nonzero_params'] / before['params']:.1%} of dense), {macs_before / macs_after:.2f}x fewer MACs, "
            f"accuracy {acc_before:.2%} -> {acc_after:.2%}")
    thin = thinness(model)
    warn_if_thin(thin, ui)
    summary = {
        "params_before": before["params"], "params": after["params"], "nonzero_params": after["nonzero_params"],
        "kept_fraction": round(after["nonzero_params"] / before["params"], 5),
        "macs_before": macs_before, "macs": macs_after, "mac_ratio": round(macs_before / macs_after, 3),
        "accuracy_before": acc_before, "accuracy_after": acc_after,
        "wall_s": round(time.perf_counter() - t0, 2), "origin": prepared.origin, "layers": after["layers"],
        "weights_per_channel": thin["weights_per_channel"], "single_weight_channels": thin["single_weight_channels"],
    }
    if key is not None:
        stored = compress_cache.store(compress_cache.cache_dir(view), key, model,
                                      {"summary": summary, "steps": [vars(r) for r in reports]})
        if stored is not None:
            ui.info(f"compress: cached the compressed model (key {key[:12]}) in {stored.parent}")
        summary = {**summary, "cache": {"key": key, "reused": False}}
    return Compressed(dense, model, data, reports, summary)


def warn_if_thin(thin: dict[str, Any], ui: UI) -> None:
    if thin["thin"]:
        ui.warn(f"compress: the prunable layers keep {thin['weights_per_channel']:g} weights per output channel "
                f"({thin['single_weight_channels']:.0%} of channels at one weight or none): a network this thin "
                "loses accuracy whatever the method; lower the sparsity, or start from a wider model")


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_outputs(result: Compressed, name: str, opset: int, out: Path, ui: UI, threads: int = 1) -> dict[str, Any]:
    """compressed.pt (the whole module), dense.onnx, compressed.onnx (at ``opset``), report.json named ``name``."""
    from ..export import export_model
    from ..profile.compare import compare_latency

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(result.model, tmp / "compressed.pt")
        shape = result.data.input_shape
        dense_onnx = export_model("onnx", result.dense, shape, tmp / "dense.onnx", opset)
        comp_onnx = export_model("onnx", result.model, shape, tmp / "compressed.onnx", opset)
        dense_t, comp_t = compare_latency([dense_onnx, comp_onnx], shape, threads=threads)
        sizes = {}
        for key, p in (("dense", dense_onnx), ("compressed", comp_onnx)):
            raw = p.read_bytes()
            sizes[key] = {"bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6))}
        onnx_report = {
            "size": sizes, "size_ratio": round(sizes["dense"]["bytes"] / sizes["compressed"]["bytes"], 3),
            "gzip_size_ratio": round(sizes["dense"]["gzip_bytes"] / sizes["compressed"]["gzip_bytes"], 3),
            "latency_ms": {"dense": dense_t["latency_ms"], "compressed": comp_t["latency_ms"]},
            "speedup": comp_t["speedup"], "speedup_spread": comp_t["speedup_spread"], "threads": threads,
        }
        ui.info(f"ONNX: {sizes['dense']['bytes']:,} -> {sizes['compressed']['bytes']:,} bytes "
                f"({onnx_report['size_ratio']}x; gzip {onnx_report['gzip_size_ratio']}x), onnxruntime latency "
                f"{dense_t['latency_ms']:.3f} -> {comp_t['latency_ms']:.3f} ms ({comp_t['speedup']}x at {threads} "
                f"thread(s), spread {comp_t['speedup_spread']})")
        report = {"name": name, **result.summary, "onnx": onnx_report,
                  "steps": [vars(s) for s in result.steps], "output": str(out)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
