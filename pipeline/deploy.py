"""``pipeline deploy``: the whole arrow for one device class, one stage after the other.

fit (optional) -> compress -> speed gate -> export/quantize -> profile vs budgets -> sign + bundle -> deliver,
or for a model file the user brings: check against the data -> quantize -> profile -> sign + bundle -> deliver.

This module only sequences the stages and assembles the report; each stage lives in its own room and takes its
own section of deploy.yaml and what the stage before produced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .broker import external_broker
from .bundle import shadow_artifact
from .bundle.drift import reference_inputs
from .bundle.stage import bundle_stage
from .config import DeployConfig
from .errors import BudgetError, ConfigError
from .export.formats import get_format
from .inputs import check_fleet_files
from .ota.http_server import plan_http
from .ota.stage import deliver_stage
from .ota.status import DeviceStatus
from .profile import host_threads, profile_model
from .profile.stage import budget_gate
from .targets import TargetProfile, target_for_deploy
from .ui import UI
from .ui.tables import print_delivery, print_fit, print_profile


def run_deploy(cfg: DeployConfig, target_name: str, ui: UI, force: bool = False, cache: bool = True,
               model_file: Path | None = None) -> dict[str, Any]:
    """Deploy to ``target_name``'s devices: the PyTorch model deploy.yaml names, compressed and exported, or a model
    file the user brings (``model_file``, else deploy.yaml's ``model.file``), shipped as it is or quantized."""
    t_start = time.perf_counter()
    target = target_for_deploy(cfg, target_name)
    check_fleet_files(cfg)  # TLS files, work and key directories: exit 2 now, not a traceback after compressing
    workdir = cfg.resolve(cfg.workdir)
    out = workdir / "build" / f"{cfg.name}-{target.name}"
    report: dict[str, Any] = {"target": target.name, "name": cfg.name}
    model_file = model_file or (cfg.resolve(cfg.model.file) if cfg.model.file else None)
    try:
        if model_file is not None:
            exported, data = _from_file(cfg, target, Path(model_file), out, ui, report)
        else:
            _check_runtime(get_format(cfg.export.format).runtime, target, f"export.format {cfg.export.format!r}")
            exported, data = _from_pytorch(cfg, target, out, ui, report, force, cache)
        with ui.stage(f"Profile against {target.name} ({target.description})"):
            prof = profile_model(exported.path, target, analysis=exported.analysis_path)
            print_profile(ui, prof, target)
            report["profile"], report["budgets"] = prof.to_dict(), [r.to_dict() for r in prof.budgets]
            budget_gate(prof, exported.path.name, ui, force)
    except BudgetError as exc:  # the report so far travels with the error (`--report` writes it)
        exc.report = {**report, **(exc.report or {})}
        raise

    serve_http, url_base = plan_http(cfg.fleet.http)
    with ui.stage("Sign and bundle"):
        artifact = bundle_stage(exported.path, data.x_test, prof, ui, name=cfg.name, workdir=workdir,
                                key_dir=cfg.resolve(cfg.signing.key_dir), url_base=url_base,
                                preprocess=data.preprocess, labels=labels_for(data, report),
                                reference_data=reference_inputs(data, cfg.drift.reference_split),
                                reference_samples=cfg.drift.reference_samples, classes=data.num_classes,
                                drift_window=cfg.drift.window)
        report["artifact"] = artifact.to_dict()
        shadow = _shadow_job(cfg, artifact, ui)

    report["delivery"], report["broker"] = deliver_stage(cfg.fleet, external_broker(cfg), target, artifact, workdir,
                                                         ui, force=force, serve_http=serve_http,
                                                         host_measured_ms=prof.measured.get("latency_ms_p50"),
                                                         shadow=shadow,
                                                         key_dir=cfg.resolve(cfg.signing.key_dir))
    print_delivery(ui, report["delivery"], prof.predicted, report["broker"]["rollout"]["limits"])
    if report["broker"]["rollout"].get("shadow") is not None:  # the shadow stage's decision, per device
        report["shadow"] = report["broker"]["rollout"]["shadow"]
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    return report


def _from_pytorch(cfg: DeployConfig, target: TargetProfile, out: Path, ui: UI, report: dict[str, Any], force: bool,
                  cache: bool):
    """fit (when asked) -> compress -> speed gate -> export: the exported model and its data."""
    from .compress.stage import compress
    from .export.stage import export_stage
    from .fit import require_best, run_fit
    from .profile.speed import speed_stage

    choice, prepared = None, None
    if cfg.fit.enabled:
        with ui.stage(f"Fit to {target.name}: compression x quantization against its budgets"):
            fitted = run_fit(cfg, target, ui)
            print_fit(ui, fitted, target)
            choice, prepared = require_best(fitted, force), fitted.prepared
            report["fit"] = fitted.to_dict()
    steps = choice.steps if choice else None
    with ui.stage(f"Compress ({cfg.data.name}, {len(steps if choice else cfg.compress)} step(s))"):
        result = compress(cfg.view_compress(), ui, steps=steps, prepared=prepared, cache=cache)  # reused when nothing changed
    if speed := speed_stage(result, host_threads(target), cfg.export.min_speedup_fraction, cfg.export.opset, ui,
                            force):
        report["speed"] = speed
    quantize = choice.quantize if choice else cfg.export.quantize
    with ui.stage(f"Export ({cfg.export.format}, quantize: {quantize})"):
        exported = export_stage(cfg.export, result.model, result.data, out, ui, quantize)
    report.update(_model_report(result, exported, cfg))
    return exported, result.data


def _from_file(cfg: DeployConfig, target: TargetProfile, path: Path, out: Path, ui: UI, report: dict[str, Any]):
    """A model file the user brings, checked against its data and transformed as ``export`` asks (no PyTorch)."""
    from .export.file_stage import file_stage
    from .export.model_file import check_inputs, inspect_model_file
    from .inputs import load_data

    with ui.stage(f"Model file {path.name}: check it against the data, quantize: {cfg.export.quantize}"):
        model = inspect_model_file(path)
        _check_runtime(model.format.runtime, target, f"{path.name} ({model.format.name})")
        if cfg.compress or cfg.fit.enabled:
            ui.info("compress/fit: skipped, they need a PyTorch model (a model file is shipped as it is, quantized "
                    "as export.quantize says)")
        data = load_data(cfg)
        check_inputs(model, data.input_shape, f"{cfg.source}: data ({cfg.data.name})")
        if model.classes is not None and model.classes != data.num_classes:
            report["class_mismatch"] = {"model": model.classes, "data": data.num_classes}
            ui.warn(f"{path.name} scores {model.classes} classes, the data has {data.num_classes}: accuracy compares "
                    f"the data's labels 0..{data.num_classes - 1} with the model's top-1 of {model.classes}, so it "
                    "says little here; calibration and the parity checks do not depend on labels")
        exported = file_stage(model, cfg.export, data, out, ui, cfg.export.quantize)
    parity, qreport = exported.parity, exported.quantization_report
    report["model"] = {"file": model.to_dict(), "accuracy_original": parity.get("accuracy_original"),
                       "accuracy_deployed": qreport.get("accuracy_quantized", parity.get("accuracy_onnx")),
                       "size_bytes": exported.size_bytes}
    report["export"] = {"format": model.format.name, "simplified": cfg.export.simplify, "parity": parity,
                        "quantization": qreport or None}
    return exported, data


def _shadow_job(cfg: DeployConfig, artifact, ui: UI):
    """With ``fleet.rollout.shadow``, the artifact's shadow job: the same payload, its manifest signed again with the
    ``shadow`` leaf (devices install it beside their active model and shadow it); else None."""
    if cfg.fleet.rollout.shadow is None:
        return None
    leaf = cfg.fleet.rollout.shadow.leaf()
    shadow = shadow_artifact(artifact, leaf, cfg.resolve(cfg.signing.key_dir))
    ui.info(f"shadow job signed: v{artifact.version} to shadow {leaf.sample:.0%} of live requests with at most "
            f"{leaf.max_cpu:.0%} of a core, beside the active model")
    return shadow


def labels_for(data, report: dict[str, Any]) -> tuple[str, ...] | None:
    """The data's class names for the manifest, unless the model scores another number of classes."""
    return None if "class_mismatch" in report else data.classes


def _check_runtime(runtime: str, target: TargetProfile, what: str) -> None:
    if runtime not in target.runtimes:
        raise ConfigError(f"{what} needs the {runtime} runtime, which {target.name} does not list (its runtimes: "
                          f"{target.runtimes}); choose another format or target")


def _model_report(result, exported, cfg: DeployConfig) -> dict[str, Any]:
    summary, parity, qreport = result.summary, exported.parity, exported.quantization_report
    return {
        "model": {**{k: summary[k] for k in ("params", "nonzero_params", "params_before", "macs", "macs_before",
                                             "accuracy_before", "accuracy_after", "origin", "layers")},
                  "accuracy_deployed": qreport.get("accuracy_quantized", parity["accuracy_onnx"]),
                  "size_bytes": exported.path.stat().st_size},
        "compression": [vars(r) for r in result.steps],
        "compression_cache": summary.get("cache"),
        "export": {"format": cfg.export.format, "opset": cfg.export.opset, "simplified": cfg.export.simplify,
                   "parity": parity, "quantization": qreport or None},
    }


def delivery_ok(report: dict[str, Any]) -> bool:
    return all(d["status"] == DeviceStatus.ACTIVATED for d in report.get("delivery", []))


__all__ = ["run_deploy", "delivery_ok"]
