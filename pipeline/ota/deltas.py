"""Delta updates in a delivery: each device gets the smallest artifact for the model it runs.

A wave's devices are grouped by the version the fleet store says they run (``FleetStore.devices()``'s
``active_version``); a group whose version has a stored full artifact (the deployment's record, as
``pipeline rollback --to`` finds it) gets a delta against it when one pays (:func:`pipeline.bundle.delta.
delta_artifact`), the others (a new device, a version whose artifact is gone, the new version itself) the full
artifact. The groups are delivered side by side; a device that refuses its delta (its model is not the base the store
recorded, the patch failed, an agent that predates deltas) gets the full artifact right after, and its result adds up
both attempts' chunks and bytes.

:func:`deliverer` returns a drop-in for :func:`pipeline.ota.delivery.deliver`, so a rollout's waves can use it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.config import BrokerConfig

from ..bundle import Artifact, load_artifact
from ..bundle.delta import DeltaChoice, delta_artifact
from ..errors import ExportError
from .delivery import DeviceResult, deliver
from .status import DeviceStatus

log = logging.getLogger(__name__)

#: the artifact a device runs, by version (None: not stored, or not a full model artifact)
BaseLookup = Callable[[int], Artifact | None]


@dataclass
class Group:
    """Devices that run one version, and what they are sent."""

    base_version: int | None
    devices: list[str]
    artifact: Artifact
    choice: DeltaChoice | None = None  # None: no base to build against (``why``)
    why: str = ""
    fallback: list[str] = field(default_factory=list)  # devices that refused the delta and got the full artifact

    @property
    def is_delta(self) -> bool:
        return self.choice is not None and self.choice.is_delta

    def to_dict(self) -> dict[str, Any]:
        return {"base_version": self.base_version, "devices": list(self.devices),
                "artifact": "delta" if self.is_delta else "full", "bytes": self.artifact.size_bytes,
                "delta": self.choice.to_dict() if self.choice is not None else None, "why": self.why or None,
                "fallback": list(self.fallback)}


@dataclass
class WaveDelivery:
    results: list[DeviceResult]
    groups: list[Group]
    #: chunk frames the host published for the wave: every group's delivery and every fallback
    egress_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "egress_bytes": self.egress_bytes}


def _egress(delivered: list[DeviceResult]) -> int:
    """What one delivery published: its own count where it keeps one (a broadcast's chunks are no device's), else
    the chunks it sent each device."""
    egress = getattr(delivered, "egress_bytes", None)
    return int(egress) if isinstance(egress, int) else sum(r.bytes_sent for r in delivered)


# --------------------------------------------------------------------------- what the fleet store knows

def running_versions(store, devices: list[str]) -> dict[str, int | None]:
    """The version each device last said it runs, from the fleet store; None for a device it has not heard of."""
    rows = {r["device_id"]: r.get("active_version") for r in store.devices()}
    return {d: rows.get(d) if isinstance(rows.get(d), int) else None for d in devices}


def stored_bases(store, target: str) -> BaseLookup:
    """The full artifact the fleet store recorded for ``target``'s version, when its directory is still there."""
    def lookup(version: int) -> Artifact | None:
        dep = store.deployment(target, version)
        if dep is None or not dep.get("artifact") or not Path(dep["artifact"]).is_dir():
            return None
        try:
            artifact = load_artifact(Path(dep["artifact"]))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("stored artifact of v%d unreadable (%s): no delta against it", version, exc)
            return None
        return artifact if artifact.manifest.delta is None and artifact.manifest.kind == "model" else None
    return lookup


# --------------------------------------------------------------------------- the plan and the delivery

def plan(full: Artifact, running: dict[str, int | None], bases: BaseLookup, key_dir: Path) -> list[Group]:
    """One group per version run, in the order devices first appear; a delta artifact built once per base."""
    by_version: dict[int | None, list[str]] = {}
    for device, version in running.items():
        by_version.setdefault(version, []).append(device)
    groups: list[Group] = []
    for version, devices in by_version.items():
        if version is None or version >= full.version:
            why = "version unknown" if version is None else f"runs v{version}, not older than v{full.version}"
            groups.append(Group(version, devices, full, why=why))
            continue
        base = bases(version)
        if base is None:
            groups.append(Group(version, devices, full, why=f"no stored artifact of v{version}"))
            continue
        try:
            choice = delta_artifact(full, base, key_dir)
        except ExportError as exc:
            groups.append(Group(version, devices, full, why=str(exc)))
            continue
        groups.append(Group(version, devices, choice.artifact, choice,
                            why="" if choice.is_delta else "no delta saves enough"))
    return groups


def refused_delta(r: DeviceResult) -> bool:
    """A device that refused its delta, for whatever reason: mostly one starting ``delta_base_mismatch`` or
    ``delta_failed`` (device_agent.delta), or an agent that reads no delta (``encoding 'delta' unknown``). The full
    artifact then shows whether the delta was the cause. A rollback (the rebuilt model failed its health check) is the
    model's verdict, not the delta's: the full artifact would be the same bytes."""
    return r.status is DeviceStatus.FAILED


def deliver_wave(broker: BrokerConfig, prefix: str, full: Artifact, devices: list[str], timeout_s: float,
                 progress: Callable[[str, DeviceResult], None] | None = None, *, running: dict[str, int | None],
                 bases: BaseLookup, key_dir: Path) -> WaveDelivery:
    """Deliver ``full``'s model to ``devices``: per group its artifact, side by side, then the full artifact to every
    device that refused a delta. ``running``: each device's version (:func:`running_versions`)."""
    groups = plan(full, {d: running.get(d) for d in devices}, bases, key_dir)
    results: dict[str, DeviceResult] = {}
    egress = [0]
    lock = threading.Lock()

    def one(group: Group) -> None:
        got = deliver(broker, prefix, group.artifact, group.devices, timeout_s, progress)
        sent = _egress(got)
        if group.is_delta:
            again = [r for r in got if refused_delta(r)]
            for r in again:
                log.info("%s refused the delta from v%s (%s): sending the full artifact", r.device_id,
                         group.base_version, r.reason)
            group.fallback = [r.device_id for r in again]
            if again:
                full_got = deliver(broker, prefix, full, group.fallback, timeout_s, progress)
                sent += _egress(full_got)
                second = {r.device_id: r for r in full_got}
                got = [_both(r, second[r.device_id]) if r.device_id in second else r for r in got]
        with lock:
            results.update({r.device_id: r for r in got})
            egress[0] += sent

    threads = [threading.Thread(target=one, args=(g,), name=f"wave-v{g.base_version}", daemon=True) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return WaveDelivery([results[d] for d in devices], groups, egress[0])


def _both(first: DeviceResult, second: DeviceResult) -> DeviceResult:
    """The full artifact's result, carrying what the refused delta cost and said."""
    second.chunks_served += first.chunks_served
    second.chunks_resent += first.chunks_resent
    second.chunks_rebroadcast += first.chunks_rebroadcast
    second.chunks_deferred += first.chunks_deferred
    second.chunks_in_flight += first.chunks_in_flight
    second.bytes_sent += first.bytes_sent
    second.states = first.states + second.states
    second.events = first.events + [{"kind": "delta_fallback", "message": first.reason or "", "ts": None}] \
        + second.events
    return second


def deliverer(running: dict[str, int | None], bases: BaseLookup, key_dir: Path,
              report: list[WaveDelivery] | None = None) -> Callable[..., list[DeviceResult]]:
    """``deliver``'s signature, delivering with deltas: for ``rollout(..., deliver=deliverer(...))``. Each wave's
    groups are appended to ``report`` when given."""
    def run(broker: BrokerConfig, prefix: str, artifact: Artifact, devices: list[str], timeout_s: float,
            progress: Callable[[str, DeviceResult], None] | None = None) -> list[DeviceResult]:
        wave = deliver_wave(broker, prefix, artifact, devices, timeout_s, progress, running=running, bases=bases,
                            key_dir=key_dir)
        if report is not None:
            report.append(wave)
        return wave.results
    return run


__all__ = ["Group", "WaveDelivery", "deliver_wave", "deliverer", "plan",
           "running_versions", "stored_bases"]
