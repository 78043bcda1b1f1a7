"""``pipeline deploy``: the whole arrow for one device class, stage after stage.

compress -> export/quantize -> profile vs budgets -> sign + bundle -> deliver over MQTT -> report
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.runtimes import runtime_for

from .bundle import build_artifact, next_version, public_key_path
from .compress.stage import compress
from .config import DeployConfig
from .errors import BudgetError, ConfigError, DeliveryError
from .fit import print_fit, require_best, run_fit
from .inputs import check_fleet_files
from .export.formats import get_format
from .export.stage import export_stage
from .fleet import FleetStore
from .broker import LocalBroker, external_broker, free_port
from .ota import LocalFleet
from .ota.http_server import ArtifactServer
from .ota.local_fleet import host_latency_ms
from .ota.rollout import RolloutPolicy, rollout
from .ota.status import DeploymentStatus, DeviceStatus
from .profile import host_threads, profile_model
from .profile.speed import speed_gate
from .targets import TargetProfile, target_for_deploy
from .ui import UI

GOLDEN_CASES = 4


def run_deploy(cfg: DeployConfig, target_name: str, ui: UI, force: bool = False, cache: bool = True) -> dict[str, Any]:
    t_start = time.perf_counter()
    target = target_for_deploy(cfg, target_name)
    check_fleet_files(cfg)  # TLS files, work and key directories: exit 2 now, not a traceback after compressing
    workdir = cfg.resolve(cfg.workdir)
    report: dict[str, Any] = {"target": target.name, "name": cfg.name}
    runtime = get_format(cfg.export.format).runtime
    if runtime not in target.runtimes:
        raise ConfigError(f"export.format {cfg.export.format!r} needs the {runtime} runtime, which {target.name} does "
                          f"not list (its runtimes: {target.runtimes}); choose another format or target")

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
    model, data, summary = result.model, result.data, result.summary
    if any("macs_reduction" in (s.params or {}) and s.params.get("macs_reduction") for s in result.steps) \
            and cfg.export.min_speedup_fraction > 0:
        with ui.stage("Check that fewer MACs means faster (onnxruntime, interleaved rounds)"):
            try:
                speed = speed_gate(result.dense, model, data.input_shape, summary["mac_ratio"], host_threads(target),
                                   cfg.export.min_speedup_fraction, cfg.export.opset)
                ui.info(f"{speed['mac_ratio']:.2f}x fewer MACs, {speed['speedup']:.2f}x faster "
                        f"(required {speed['required']:.2f}x)")
                report["speed"] = speed
            except BudgetError as exc:
                if not force:
                    raise
                ui.warn(f"{exc}\n  deploying anyway (--force)")

    out = workdir / "build" / f"{cfg.name}-{target.name}"
    quantize = choice.quantize if choice else cfg.export.quantize
    with ui.stage(f"Export ({cfg.export.format}, quantize: {quantize})"):
        exported = export_stage(cfg.export, model, data, out, ui, quantize)
    final, parity, qreport = exported.path, exported.parity, exported.quantization_report
    deployed_accuracy = qreport.get("accuracy_quantized", parity["accuracy_onnx"])

    report["model"] = {
        **{k: summary[k] for k in ("params", "nonzero_params", "params_before", "macs", "macs_before",
                                   "accuracy_before", "accuracy_after", "origin", "layers")},
        "accuracy_deployed": deployed_accuracy, "size_bytes": final.stat().st_size,
    }
    report["compression"] = [vars(r) for r in result.steps]
    report["compression_cache"] = summary.get("cache")
    report["export"] = {"format": cfg.export.format, "opset": cfg.export.opset, "simplified": cfg.export.simplify,
                        "parity": parity, "quantization": qreport or None}

    with ui.stage(f"Profile against {target.name} ({target.description})"):
        prof = profile_model(final, target, analysis=exported.analysis_path)
        _print_profile(ui, prof, target)
        report["profile"] = prof.to_dict()
        report["budgets"] = [r.to_dict() for r in prof.budgets]
        if prof.failures:
            message = f"{final.name} does not fit {target.name}:\n  " + "\n  ".join(prof.failures)
            if not force:
                raise BudgetError(message + "\nCompress harder, relax budgets in deploy.yaml, or pass --force.",
                                  report)
            ui.warn(message + "\n  deploying anyway (--force)")

    with ui.stage("Sign and bundle"):
        key_dir = cfg.resolve(cfg.signing.key_dir)
        budgets = {r.name: r.limit for r in prof.budgets}
        http = cfg.fleet.http
        if http.serve and not http.port:
            http = http.model_copy(update={"port": free_port()})
        url_base = http.base_url or (f"http://{http.host}:{http.port}" if http.serve else None)
        artifact = build_artifact(
            final, workdir / "artifacts", name=cfg.name, version=next_version(workdir), target=target.name,
            url_base=url_base,
            runtime=runtime_for(final), golden_inputs=data.x_test[:GOLDEN_CASES], budgets=budgets,
            predicted=prof.predicted, health={"max_rss_mb": None, "max_latency_ms": None, "runs": 20},
            key_dir=key_dir,
        )
        ui.info(f"{artifact.dir.name}: {artifact.size_bytes:,} bytes, sha256 {artifact.sha256[:16]}…, "
                f"{artifact.manifest.chunks} chunk(s), signed with {public_key_path(key_dir)}")
        report["artifact"] = artifact.to_dict()

    report["delivery"], report["broker"] = _deliver(cfg, target, artifact, workdir, ui, force=force,
                                                    serve_http=http if http.serve else None)
    _print_delivery(ui, report["delivery"], prof.predicted, report["broker"]["rollout"]["limits"])
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    return report


def open_fleet(cfg: DeployConfig, target: TargetProfile, workdir: Path, stack: contextlib.ExitStack, ui: UI,
               trusted_key: Path) -> tuple[BrokerConfig, dict[str, Any], list[str]]:
    """The broker (deploy.yaml's, or a local one started here) and the device ids of ``target``'s class
    (fleet.devices, or local agents standing in for it, started here)."""
    fleet = cfg.fleet
    external = external_broker(cfg)
    if external is not None:
        broker = external
        broker_info = {"kind": "external", "host": broker.host, "port": broker.port}
    else:
        local = stack.enter_context(LocalBroker(fleet.local_broker, workdir / "broker"))
        broker = local.config
        broker_info = {"kind": local.kind, "host": broker.host, "port": broker.port, "local": True}
        ui.info(f"local {local.kind} broker on {broker.host}:{broker.port} (MQTT {local.protocol})")
    devices = fleet.device_ids(target.name)
    if fleet.devices and not devices:
        raise DeliveryError(f"fleet.devices has no device of class {target.name} (classes there: "
                            f"{', '.join(sorted({d.target or '?' for d in fleet.devices}))})")
    if not devices:
        if fleet.local_agents == 0:
            raise DeliveryError("deploy.yaml names no fleet.devices and fleet.local_agents is 0: nowhere to deliver")
        local_fleet = stack.enter_context(LocalFleet(
            workdir / "devices", broker, target.name, fleet.local_agents, trusted_key, fleet.topic_prefix,
            threads=host_threads(target)))
        devices = local_fleet.device_ids
        ui.info(f"{len(devices)} local agent(s) emulating {target.name}: {', '.join(devices)}")
    return broker, broker_info, devices


def _deliver(cfg: DeployConfig, target: TargetProfile, artifact, workdir: Path, ui: UI, kind: str = "deploy",
             force: bool = False, serve_http=None):
    fleet = cfg.fleet
    r = fleet.rollout
    judge_latency = r.abort_on_latency and not force
    # real devices meet the target's budget; emulated agents (on this host) the prediction for this host
    policy = RolloutPolicy(r.canary_fraction, r.canary_min, r.max_failure_fraction,
                           target.budgets.latency_ms if judge_latency else None,
                           host_latency_ms=host_latency_ms(artifact) if judge_latency else None)
    db = workdir / "fleet.db"
    with contextlib.ExitStack() as stack:
        broker, broker_info, devices = open_fleet(cfg, target, workdir, stack, ui, artifact.dir / "signing.pub")
        if serve_http is not None:
            server = stack.enter_context(ArtifactServer(workdir / "artifacts", serve_http.host, serve_http.port))
            ui.info(f"serving artifacts over HTTP at {server.base_url} (devices fetch with Range requests)")
        store = FleetStore(db)  # opened once per delivery: this thread's connection, and the progress writer's
        try:
            dep = store.start(name=artifact.manifest.name, target=target.name, version=artifact.version,
                              sha256=artifact.sha256, artifact=str(artifact.dir), kind=kind, devices=devices)
        except BaseException:
            store.close()
            raise
        updates = store.progress_queue(dep)

        def progress(state: str, d) -> None:  # on paho's network thread: queued, never a write to SQLite here
            ui.info(f"{d.device_id}: {state}")
            updates.put(d.device_id, state)  # live in `pipeline dashboard`

        with ui.stage(f"Deliver v{artifact.version} over MQTT to {len(devices)} device(s), canaries first"):
            try:
                with updates:  # every queued state is written before the deployment's record ends
                    result = rollout(broker, fleet.topic_prefix, artifact, devices, fleet.timeout_s, policy,
                                     progress=progress, note=ui.info)
            except BaseException as exc:  # the deployment's record ends, whatever stopped it
                try:
                    store.finish(dep, status="failed", reason=f"{type(exc).__name__}: {exc}", results=[])
                finally:
                    store.close()
                raise
    delivery = [{**d.to_dict(), "phase": result.phases.get(d.device_id)} for d in result.results]
    ok = not result.aborted and all(d["status"] == DeviceStatus.ACTIVATED for d in delivery)
    try:
        # devices a rollout never reached (it stopped after the canaries) keep no row
        store.finish(dep, status=DeploymentStatus.SUCCEEDED if ok else (
                     DeploymentStatus.ABORTED if result.aborted else DeploymentStatus.FAILED),
                     reason=result.reason, results=delivery, rollout=result.to_dict())
        store.ingest(_telemetry(delivery, target.name, local=not fleet.devices))
    finally:
        store.close()
    return delivery, {**broker_info, "rollout": result.to_dict()}


def _telemetry(delivery: list[dict[str, Any]], target: str, local: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """What the devices reported during the delivery, as fleet telemetry: the fleet view and dashboard show a
    fleet right after a deploy even when no ingester ran. Local agents stopped with the deploy: offline."""
    now = time.time()
    out: list[tuple[str, str, dict[str, Any]]] = []
    for d in delivery:
        device = d["device_id"]
        if local:
            out.append((device, "online", {"online": False, "ts": now}))
        if not d["states"] and not d.get("device_state"):  # it never answered: nothing it said to record
            continue
        # the state the device last said it is in (after a rollback command: activated, or whatever it kept)
        out.append((device, "status", {"target": target, "active_version": d.get("active_version"),
                                       "active_slot": (d.get("metrics") or {}).get("slot"),
                                       "state": d.get("device_state") or d["states"][-1],
                                       "ts": now}))
        if d.get("metrics"):
            out.append((device, "metrics", {**d["metrics"], "version": d.get("active_version"),
                                            "ts": d["metrics"].get("ts") or now}))
        out += [(device, "events", {**e, "version": d.get("active_version")}) for e in d.get("events") or []]
    return out


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
