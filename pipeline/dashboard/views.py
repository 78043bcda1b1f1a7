"""What the dashboard, its JSON API and ``/metrics`` show, computed from the fleet store alone.

Budgets come from each device's target class (``targets/*.yaml`` with deploy.yaml's overrides); a device is
over budget when its latest p95 latency, RSS or energy per inference exceeds the class's limit."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.protocol import TERMINAL_STATES, State

from ..errors import ConfigError
from ..fleet.accuracy import prediction_check
from ..fleet.quality import quality_summary
from ..fleet.store import FleetStore
from ..fleet.traffic import traffic_summary
from ..ota.status import SETTLED, DeviceStatus

#: budget name -> (metric it limits, unit)
BUDGET_METRICS = {"latency_ms": ("latency_ms_p95", "ms"), "peak_memory_mb": ("rss_mb", "MB"),
                  "energy_mj": ("energy_mj", "mJ")}


@dataclass
class BudgetBook:
    """Budgets per target class, resolved once; an unknown class has none (shown as 'unknown', not an error)."""

    resolve: Callable[[str], dict[str, float | None]]
    _cache: dict[str, dict[str, float | None] | None] = field(default_factory=dict)

    def get(self, target: str | None) -> dict[str, float | None] | None:
        if not target:
            return None
        if target not in self._cache:
            try:
                self._cache[target] = self.resolve(target)
            except ConfigError:
                self._cache[target] = None
        return self._cache[target]

    @classmethod
    def from_config(cls, cfg=None) -> "BudgetBook":
        from ..targets import load_target, target_for_deploy

        if cfg is None:
            return cls(lambda name: load_target(name).budgets.model_dump())
        return cls(lambda name: target_for_deploy(cfg, name).budgets.model_dump())


def budget_status(metrics: dict[str, Any] | None, budgets: dict[str, float | None] | None) -> dict[str, Any]:
    if not metrics or not budgets:
        return {"status": "unknown", "over": []}
    over = [name for name, (metric, _) in BUDGET_METRICS.items()
            if budgets.get(name) is not None and metrics.get(metric) is not None and metrics[metric] > budgets[name]]
    return {"status": "over" if over else "ok", "over": over}


_SETTLED = {s.value for s in TERMINAL_STATES} | {State.IDLE.value}
#: a device's outcome in a deployment, once it has one (rows of a running one hold the state last reported)
_RESULTS_SETTLED = {s.value for s in SETTLED}


class FleetView:
    def __init__(self, store: FleetStore, budgets: BudgetBook, offline_after_s: float = 120.0) -> None:
        self.store, self.budgets, self.offline_after_s = store, budgets, offline_after_s

    def online(self, device: dict[str, Any], now: float) -> bool:
        """The retained online/offline message (the broker's last will) when there is one, else freshness."""
        if device.get("online") is not None:
            return bool(device["online"])
        return bool(device.get("last_seen")) and now - device["last_seen"] <= self.offline_after_s

    def overview(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        devices = []
        for d in self.store.devices():
            budgets = self.budgets.get(d.get("target"))
            d["online"] = self.online(d, now)
            d["updating"] = bool(d.get("job_id")) and d.get("state") not in _SETTLED
            d["budgets"] = budgets
            d["budget"] = budget_status(d["metrics"], budgets)
            devices.append(d)
        return {"generated_at": now, "devices": devices,
                "counts": {"devices": len(devices), "online": sum(d["online"] for d in devices),
                           "over_budget": sum(d["budget"]["status"] == "over" for d in devices),
                           "updating": sum(d["updating"] for d in devices)}}

    def device(self, device_id: str, since: float = 0.0) -> dict[str, Any] | None:
        row = self.store.db.execute("SELECT target FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            return None
        return {"device_id": device_id, "target": row["target"], "budgets": self.budgets.get(row["target"]),
                "series": self.store.series(device_id, since), "events": self.store.events(50, device_id)}

    def deployments(self, limit: int = 20) -> list[dict[str, Any]]:
        out = []
        for dep in self.store.history(limit=limit):
            results = self.store.results(dep["id"])
            dep["rollout"] = json.loads(dep["rollout"]) if dep.get("rollout") else None
            dep["devices"] = [{k: r[k] for k in ("device_id", "phase", "status", "active_version", "reason")}
                              for r in results]
            by_status: dict[str, int] = {}
            for r in results:
                by_status[r["status"]] = by_status.get(r["status"], 0) + 1
            # a running deployment (status in_progress) has a row per device, updated as each moves on
            dep["progress"] = {"total": len(results), "by_status": by_status,
                               "done": sum(n for st, n in by_status.items() if st in _RESULTS_SETTLED),
                               # a rollback succeeds by rolling back (as the device confirmed); a deploy only by
                               # activating
                               "succeeded": by_status.get(DeviceStatus.ROLLED_BACK if dep["kind"] == "rollback"
                                                          else DeviceStatus.ACTIVATED, 0)}
            out.append(dep)
        return out

    def events(self, limit: int = 100, device: str | None = None) -> list[dict[str, Any]]:
        return self.store.events(limit, device)

    def predictions(self) -> dict[str, Any]:
        """The fleet's measurements against what was predicted, per class (``pipeline.fleet.accuracy``)."""
        return prediction_check(self.store)

    def traffic(self) -> dict[str, Any]:
        """What the devices' applications asked of their models, per device and per class and version
        (``pipeline.fleet.traffic``)."""
        return traffic_summary(self.store)

    def quality(self) -> dict[str, Any]:
        """How good each device's model is on its live traffic: drift per device and version with its state, live
        accuracy, shadow comparisons (``pipeline.fleet.quality``)."""
        return quality_summary(self.store)
