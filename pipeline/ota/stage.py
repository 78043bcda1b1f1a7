"""The delivery stage: open the fleet (the user's broker or a local one, the class's devices or local agents
standing in for them), roll the artifact out canaries first, and record the deployment and what the devices
reported in the fleet store."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from device_agent.config import BrokerConfig

from ..broker import LocalBroker
from ..bundle import Artifact
from ..config import FleetConfig, HttpConfig
from ..errors import DeliveryError
from ..fleet import FleetStore
from ..fleet.accuracy import predictions
from ..profile import host_threads
from ..targets import TargetProfile
from ..ui import UI
from . import deltas
from .broadcast import broadcasting
from .delivery import deliver
from .http_server import ArtifactServer
from .local_fleet import LocalFleet, host_prediction
from .rollout import RolloutPolicy, rollout
from .shadow import ShadowPolicy
from .status import DeploymentStatus, DeviceStatus


def open_fleet(fleet: FleetConfig, external: BrokerConfig | None, target: TargetProfile, workdir: Path,
               stack: contextlib.ExitStack, ui: UI, trusted_key: Path) -> tuple[BrokerConfig, dict[str, Any], list[str]]:
    """The broker (deploy.yaml's, or a local one started here) and the device ids of ``target``'s class
    (fleet.devices, or local agents standing in for it, started here)."""
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


def deliver_stage(fleet: FleetConfig, external: BrokerConfig | None, target: TargetProfile, artifact: Artifact,
                  workdir: Path, ui: UI, kind: str = "deploy", force: bool = False,
                  serve_http: HttpConfig | None = None, host_measured_ms: float | None = None,
                  shadow: Artifact | None = None, key_dir: Path | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Deliver ``artifact`` to ``target``'s devices (canaries first), recording the deployment in the fleet store.

    ``external``: the user's broker (``fleet.broker``, paths resolved), else a local one is started; returns each
    device's result and what was used (broker, rollout). ``host_measured_ms``: this model's p50 measured on this
    host (the profile stage's), which emulated agents are judged against; else this host's prediction.
    ``shadow``: ``artifact``'s shadow job (:func:`pipeline.bundle.shadow_artifact`): with ``fleet.rollout.shadow``,
    the rollout starts with a shadow stage (pipeline.ota.shadow); without it, none. ``key_dir``: the signing key,
    with which a device that runs a version this host has the artifact of is sent a delta against it
    (``fleet.deltas``, pipeline.ota.deltas); without it, full artifacts only."""
    r = fleet.rollout
    judge_latency = r.abort_on_latency and not force
    on_host = host_prediction(artifact)  # analysed once: the rollout's fallback and the fleet store's record
    host_predicted_ms = float(on_host["latency_ms"]) if on_host is not None else None
    # real devices meet the target's budget; emulated agents (on this host) the prediction for this host
    policy = RolloutPolicy(r.canary_fraction, r.canary_min, r.max_failure_fraction,
                           target.budgets.latency_ms if judge_latency else None,
                           host_latency_ms=(host_measured_ms or host_predicted_ms) if judge_latency else None,
                           host_basis="measured" if host_measured_ms else "predicted",
                           shadow=ShadowPolicy(**r.shadow.model_dump()) if r.shadow and shadow else None)
    if r.shadow is not None and shadow is None:
        ui.info(f"rollout.shadow: no shadow stage for this {kind} (no shadow job was signed for it)")
    predicted = predictions(target.name, artifact.manifest.predicted, on_host)
    db = fleet.store_at(workdir)
    with contextlib.ExitStack() as stack:
        broker, broker_info, devices = open_fleet(fleet, external, target, workdir, stack, ui,
                                                  artifact.dir / "signing.pub")
        if serve_http is not None:
            server = stack.enter_context(ArtifactServer(workdir / "artifacts", serve_http.host, serve_http.port))
            ui.info(f"serving artifacts over HTTP at {server.base_url} (devices fetch with Range requests)")
        store = FleetStore(db)  # opened once per delivery: this thread's connection, and the progress writer's
        try:
            dep = store.start(name=artifact.manifest.name, target=target.name, version=artifact.version,
                              sha256=artifact.sha256, artifact=str(artifact.dir), kind=kind, devices=devices,
                              predicted=predicted)
        except BaseException:
            store.close()
            raise
        updates = store.progress_queue(dep)

        def progress(state: str, d) -> None:  # on paho's network thread: queued, never a write to SQLite here
            ui.info(f"{d.device_id}: {state}")
            updates.put(d.device_id, state)  # live in `pipeline dashboard`

        first = "a shadow stage, then canaries" if policy.shadow is not None else "canaries first"
        with ui.stage(f"Deliver v{artifact.version} over MQTT to {len(devices)} device(s), {first}"):
            try:
                # every queued state is written before the deployment's record ends; waves broadcast per fleet.broadcast
                waves: list = []
                send = deliver
                if fleet.deltas and key_dir is not None and kind != "rollback":
                    send = deltas.deliverer(deltas.running_versions(store, devices),
                                            deltas.stored_bases(store, target.name), key_dir, waves)
                with updates, broadcasting(fleet.broadcast):
                    result = rollout(broker, fleet.topic_prefix, artifact, devices, fleet.timeout_s, policy,
                                     progress=progress, note=ui.info, shadow=shadow, send=send)
                for w in waves:
                    for g in w.groups:
                        if g.is_delta:
                            ui.info(f"{', '.join(g.devices)}: a delta against v{g.base_version} "
                                    f"({g.artifact.size_bytes:,} of {artifact.size_bytes:,} bytes)")
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
        store.ingest(telemetry(delivery, target.name, local=not fleet.devices))
    finally:
        store.close()
    return delivery, {**broker_info, "rollout": result.to_dict(), "deltas": [w.to_dict() for w in waves]}


def telemetry(delivery: list[dict[str, Any]], target: str, local: bool) -> list[tuple[str, str, dict[str, Any]]]:
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
