"""``pipeline deploy``: the whole arrow for one device class, one stage after the other.

fit (optional) -> compress -> speed gate -> export/quantize -> profile vs budgets -> sign + bundle -> deliver

This module only sequences the stages and assembles the report; each stage lives in its own room and takes its
own section of deploy.yaml and what the stage before produced.
"""

from __future__ import annotations

import time
from typing import Any

from .broker import external_broker
from .bundle.stage import bundle_stage
from .compress.stage import compress
from .config import DeployConfig
from .errors import BudgetError, ConfigError
from .export.formats import get_format
from .export.stage import export_stage
from .fit import print_fit, require_best, run_fit
from .inputs import check_fleet_files
from .ota.http_server import plan_http
from .ota.stage import deliver_stage
from .ota.status import DeviceStatus
from .profile import host_threads, profile_model
from .profile.speed import speed_stage
from .profile.stage import budget_gate
from .targets import TargetProfile, target_for_deploy
from .ui import UI


def run_deploy(cfg: DeployConfig, target_name: str, ui: UI, force: bool = False, cache: bool = True) -> dict[str, Any]:
    t_start = time.perf_counter()
    target = target_for_deploy(cfg, target_name)
    check_fleet_files(cfg)  # TLS files, work and key directories: exit 2 now, not a traceback after compressing
    _check_runtime(cfg, target)
    workdir = cfg.resolve(cfg.workdir)
    report: dict[str, Any] = {"target": target.name, "name": cfg.name}
    try:
        choice, prepared = None, None
        if cfg.fit.enabled:
            with ui.stage(f"Fit to {target.name}: compression x quantization against its budgets"):
                fitted = run_fit(cfg, target, ui)
                print_fit(ui, fitted, target)
                choice, prepared = require_best(fitted, force), fitted.prepared
                report["fit"] = fitted.to_dict()
        steps = choice.steps if choice else None
        with ui.stage(f"Compress ({cfg.data.name}, {len(steps if choice else cfg.compress)} step(s))"):
            result = compress(cfg, ui, steps=steps, prepared=prepared, cache=cache)  # reused when nothing changed
        if speed := speed_stage(result, host_threads(target), cfg.export.min_speedup_fraction, cfg.export.opset,
                                ui, force):
            report["speed"] = speed

        quantize = choice.quantize if choice else cfg.export.quantize
        with ui.stage(f"Export ({cfg.export.format}, quantize: {quantize})"):
            exported = export_stage(cfg.export, result.model, result.data,
                                    workdir / "build" / f"{cfg.name}-{target.name}", ui, quantize)
        report.update(_model_report(result, exported, cfg))

        with ui.stage(f"Profile against {target.name} ({target.description})"):
            prof = profile_model(exported.path, target, analysis=exported.analysis_path)
            _print_profile(ui, prof, target)
            report["profile"], report["budgets"] = prof.to_dict(), [r.to_dict() for r in prof.budgets]
            budget_gate(prof, exported.path.name, ui, force)
    except BudgetError as exc:  # the report so far travels with the error (`--report` writes it)
        exc.report = {**report, **(exc.report or {})}
        raise

    serve_http, url_base = plan_http(cfg.fleet.http)
    with ui.stage("Sign and bundle"):
        artifact = bundle_stage(exported.path, result.data.x_test, prof, ui, name=cfg.name, workdir=workdir,
                                key_dir=cfg.resolve(cfg.signing.key_dir), url_base=url_base)
        report["artifact"] = artifact.to_dict()

    report["delivery"], report["broker"] = deliver_stage(cfg.fleet, external_broker(cfg), target, artifact, workdir,
                                                         ui, force=force, serve_http=serve_http)
    _print_delivery(ui, report["delivery"], prof.predicted, report["broker"]["rollout"]["limits"])
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    return report


def _check_runtime(cfg: DeployConfig, target: TargetProfile) -> None:
    runtime = get_format(cfg.export.format).runtime
    if runtime not in target.runtimes:
        raise ConfigError(f"export.format {cfg.export.format!r} needs the {runtime} runtime, which {target.name} does "
                          f"not list (its runtimes: {target.runtimes}); choose another format or target")


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


def _print_profile(ui: UI, prof, target: TargetProfile) -> None:
    s, p, m = prof.static, prof.predicted, prof.measured
    ui.info(f"static: {s.params:,} parameters ({s.nonzero_params:,} nonzero), {s.macs:,} MACs, "
            f"{s.size_bytes:,} bytes, peak activations {s.peak_activation_bytes / 1024:.1f} KiB"
            f"{', int8' if s.quantized else ''}")
    ui.info(f"predicted on {target.name}: {p['latency_ms']:.3f} ms, {p['peak_memory_mb']:.1f} MB, "
            f"{p['energy_mj']:.3f} mJ per inference ({p['basis']})")
    ui.info(f"measured on this host (emulated, {m['threads']} thread(s)): p50 {m['latency_ms_p50']:.3f} ms, "
            f"p95 {m['latency_ms_p95']:.3f} ms, RSS {m['rss_mb']:.1f} MB")
    rows = [[r.name, f"{r.limit:g} {r.unit}", f"{r.value:g} {r.unit}", r.source, f"{r.margin:+.0%}",
             "pass" if r.passed else "FAIL"] for r in prof.budgets]
    ui.table(f"Budgets for {target.name}", ["budget", "limit", "value", "source", "margin", "result"], rows,
             ["green" if r.passed else "bold red" for r in prof.budgets])


def _print_delivery(ui: UI, delivery: list[dict[str, Any]], predicted: dict[str, Any],
                    limits: dict[str, Any] | None = None) -> None:
    """One row per device: its status as the device said it (or ``timeout`` / ``no_answer`` when it said
    nothing), what it measured, and what was predicted for the target and, for emulated agents, for this host."""
    host_ms = (limits or {}).get("host_predicted_latency_ms")
    emulated = any((d.get("metrics") or {}).get("emulated") for d in delivery)
    rows = []
    for d in delivery:
        m = d.get("metrics") or {}
        rows.append([d["device_id"], str(d["status"]), d["active_version"],
                     f"{m['latency_ms_p50']:.3f}" if m else "-", f"{m['latency_ms_p95']:.3f}" if m else "-",
                     f"{m['rss_mb']:.1f}" if m else "-", f"{predicted['latency_ms']:.3f}",
                     *([f"{host_ms:.3f}" if host_ms is not None and m.get("emulated") else "-"] if emulated else []),
                     d.get("reason") or ""])
    ui.table("Delivery" + (" (p50/p95/RSS measured on this host by emulated agents, judged against the "
                           "prediction for this host, not the target's budget)" if emulated else ""),
             ["device", "status", "version", "p50 ms", "p95 ms", "RSS MB", "target predicted ms",
              *(["host predicted ms"] if emulated else []), "reason"], rows,
             ["green" if d["status"] == DeviceStatus.ACTIVATED else "bold red" for d in delivery])


def delivery_ok(report: dict[str, Any]) -> bool:
    return all(d["status"] == DeviceStatus.ACTIVATED for d in report.get("delivery", []))


__all__ = ["run_deploy", "delivery_ok"]
