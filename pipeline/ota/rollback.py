"""``pipeline rollback --target T [--to VERSION]``: bring a device class back to an earlier model.

Without ``--to``, each device switches back to the model in its other slot (the one it ran before).
With ``--to VERSION``, that version's model is signed again under a new, higher version number and
delivered: versions only move forward, so a replayed old manifest stays refused.
"""

from __future__ import annotations

import contextlib
import tempfile
import zlib
from pathlib import Path
from typing import Any

from device_agent.manifest import decode_tensor

from ..broker import external_broker
from ..bundle import build_artifact, load_artifact, next_version
from ..config import DeployConfig
from ..errors import DeliveryError
from ..fleet import FleetStore
from ..targets import target_for_deploy
from ..ui import UI
from .commands import roll_back
from .stage import deliver_stage, open_fleet
from .status import DeploymentStatus, DeviceStatus


def resign(old_dir: Path, workdir: Path, key_dir: Path, out_root: Path):
    """The model of an earlier artifact, signed again under a new version: the same golden inputs, budgets,
    predictions and health limits, and what the device's application and monitors read from the manifest (the
    preprocessing spec, the class names, the drift reference), so a rolled-back model serves as it did."""
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
                          health=m.health, key_dir=key_dir, preprocess=m.preprocess, labels=m.labels,
                          reference=m.reference)


def run_rollback(cfg: DeployConfig, target_name: str, ui: UI, to_version: int | None = None) -> dict[str, Any]:
    target = target_for_deploy(cfg, target_name)
    workdir = cfg.resolve(cfg.workdir)
    key_dir = cfg.resolve(cfg.signing.key_dir)
    report: dict[str, Any] = {"target": target.name, "to_version": to_version}
    if to_version is not None:
        store = FleetStore(cfg.fleet.store_at(workdir))
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
        report["delivery"], report["broker"] = deliver_stage(cfg.fleet, external_broker(cfg), target, artifact,
                                                            workdir, ui, kind="rollback")
        return report
    with contextlib.ExitStack() as stack, ui.stage(f"Roll {target.name} back to each device's previous model"):
        broker, info, devices = open_fleet(cfg.fleet, external_broker(cfg), target, workdir, stack, ui,
                                             key_dir / "signing.pub")
        answers = roll_back(broker, cfg.fleet.topic_prefix, devices, cfg.fleet.timeout_s)
    for a in answers:
        ui.info(f"{a.device_id}: {a.status}" + (f" (active v{a.active_version})" if a.active_version else "")
                + (f" {a.message}" if a.message else ""))
    results = [a.to_dict() for a in answers]
    ok = all(a.status is DeviceStatus.ROLLED_BACK for a in answers)
    store = FleetStore(cfg.fleet.store_at(workdir))
    try:
        # the version the devices now run, when they all said the same one; else -1
        versions = {a.active_version for a in answers}
        version = next(iter(versions)) if len(versions) == 1 else None
        store.record(name=cfg.name, target=target.name, version=version if version is not None else -1,
                     sha256="", artifact="", kind="rollback",
                     status=DeploymentStatus.SUCCEEDED if ok else DeploymentStatus.FAILED,
                     reason=None if ok else "; ".join(f"{a.device_id}: {a.status}" for a in answers
                                                      if a.status is not DeviceStatus.ROLLED_BACK),
                     results=results)
    finally:
        store.close()
    report["delivery"], report["broker"] = results, info
    return report
