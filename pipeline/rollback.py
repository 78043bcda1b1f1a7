"""``pipeline rollback --target T [--to VERSION]``: bring a device class back to an earlier model.

Without ``--to``, each device switches back to the model in its other slot (the one it ran before).
With ``--to VERSION``, that version's model is signed again under a new, higher version number and
delivered: versions only move forward, so a replayed old manifest stays refused.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from device_agent.manifest import decode_tensor
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, ProtocolError, decode, encode, parse_topic, topic

from .bundle import build_artifact, load_artifact, next_version
from .config import DeployConfig
from .errors import DeliveryError
from .fleet import FleetStore
from .targets import target_for_deploy
from .ui import UI


def command_and_wait(broker, prefix: str, devices: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Send ``rollback`` to each device and collect what it answers (its status, or a refusal event)."""
    results = {d: {"device_id": d, "status": "timeout", "active_version": None, "reason": None} for d in devices}
    done = {d: threading.Event() for d in devices}
    asked_at = time.time()

    def on_message(name: str, payload: bytes) -> None:
        try:
            device, leaf = parse_topic(prefix, name)
            body = decode(payload, leaf.value)
        except ProtocolError:
            return
        r = results.get(device)
        if r is None or body.get("ts", 0) < asked_at - 1:  # a retained answer to an earlier command
            return
        if leaf is Leaf.STATUS and body.get("reason") == "rolled back on command":
            r.update(status="rolled_back", active_version=body.get("active_version"), reason=body.get("reason"))
            done[device].set()
        elif leaf is Leaf.EVENTS and body.get("kind") == "rollback_refused":
            r.update(status="failed", reason=body.get("message"))
            done[device].set()

    link = MqttLink(broker, f"host-rollback-{uuid.uuid4().hex[:8]}", on_message,
                    [(f"{prefix}/v1/+/status", 1), (f"{prefix}/v1/+/events", 1)]).start()
    try:
        time.sleep(0.2)  # let retained statuses go by before asking
        for d in devices:
            link.publish(topic(prefix, d, Leaf.CMD), encode({"command": "rollback"}), qos=1)
        deadline = time.monotonic() + timeout_s
        for d in devices:
            done[d].wait(max(0.0, deadline - time.monotonic()))
    finally:
        link.stop()
    return [results[d] for d in devices]


def resign(old_dir: Path, workdir: Path, key_dir: Path, out_root: Path):
    """The model of an earlier artifact, signed again under a new version (same golden inputs and budgets)."""
    old = load_artifact(old_dir)
    m = old.manifest
    raw = old.model_path.read_bytes()
    if m.encoding == "zlib":
        raw = zlib.decompress(raw)
    tmp = Path(tempfile.mkdtemp(prefix="resign-"))
    model = tmp / m.filename
    model.write_bytes(raw)
    import numpy as np

    golden = np.concatenate([decode_tensor(next(iter(c["inputs"].values())), "golden") for c in m.golden["cases"]])
    return build_artifact(model, out_root, name=m.name, version=next_version(workdir), target=m.target,
                          runtime=m.runtime, golden_inputs=golden, budgets=m.budgets, predicted=m.predicted,
                          health=m.health, key_dir=key_dir)


def run_rollback(cfg: DeployConfig, target_name: str, ui: UI, to_version: int | None = None) -> dict[str, Any]:
    from .deploy import _deliver, open_fleet

    target = target_for_deploy(cfg, target_name)
    workdir = cfg.resolve(cfg.workdir)
    key_dir = cfg.resolve(cfg.signing.key_dir)
    report: dict[str, Any] = {"target": target.name, "to_version": to_version}
    if to_version is not None:
        store = FleetStore(workdir / "fleet.db")
        try:
            dep = store.deployment(target.name, to_version)
        finally:
            store.close()
        if dep is None or not Path(dep["artifact"]).is_dir():
            raise DeliveryError(f"no artifact of version {to_version} for {target.name} in {workdir}; "
                                "`pipeline rollback` without --to switches devices to their previous model")
        with ui.stage(f"Sign the model of v{to_version} again as a new version"):
            artifact = resign(Path(dep["artifact"]), workdir, key_dir, workdir / "artifacts")
            ui.info(f"v{to_version}'s model is v{artifact.version} now")
        report["artifact"] = artifact.to_dict()
        report["delivery"], report["broker"] = _deliver(cfg, target, artifact, workdir, ui, kind="rollback")
        return report
    with contextlib.ExitStack() as stack, ui.stage(f"Roll {target.name} back to each device's previous model"):
        broker, info, devices = open_fleet(cfg, target, workdir, stack, ui, key_dir / "signing.pub")
        results = command_and_wait(broker, cfg.fleet.topic_prefix, devices, cfg.fleet.timeout_s)
    for r in results:
        ui.info(f"{r['device_id']}: {r['status']} (active v{r['active_version']}) {r['reason'] or ''}")
    store = FleetStore(workdir / "fleet.db")
    try:
        versions = {r["active_version"] for r in results}
        store.record(name=cfg.name, target=target.name, version=next(iter(versions)) if len(versions) == 1 else -1,
                     sha256="", artifact="", kind="rollback",
                     status="succeeded" if all(r["status"] == "rolled_back" for r in results) else "failed",
                     reason=None, results=results)
    finally:
        store.close()
    report["delivery"], report["broker"] = results, info
    return report
