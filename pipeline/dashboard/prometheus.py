"""``/metrics`` in the Prometheus text exposition format (version 0.0.4).

Naming follows Prometheus conventions: an ``edgefleet_`` prefix, base units in the name (seconds, bytes, joules,
celsius, ratio), ``_total`` for counters. Labels are bounded by the fleet: ``device``, ``target``, ``quantile``,
``budget``, ``status``, ``source``; nothing per request or per message. Each device's figures are its latest
report; Prometheus keeps the history (the store keeps it too, for the built-in dashboard)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .views import BUDGET_METRICS, FleetView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: Any) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, Any], float | None]]):
        samples = [(labels, value) for labels, value in samples if value is not None]
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        sample_name = name + "_total" if kind == "counter" else name
        for labels, value in samples:
            tags = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if v is not None)
            self.lines.append(f"{sample_name}{{{tags}}} {float(value):.10g}" if tags else f"{sample_name} {float(value):.10g}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else float(value) * factor


def render(view: FleetView, ingest: dict[str, int] | None = None) -> str:
    """The whole exposition; ``ingest``: this process's ingester counters, when it runs one."""
    overview = view.overview()
    devices = overview["devices"]
    out = _Exposition()

    def per_device(key: str, factor: float = 1.0, extra: dict[str, Any] | None = None):
        return [({"device": d["device_id"], **(extra or {})}, _scaled((d["metrics"] or {}).get(key), factor))
                for d in devices]

    out.family("edgefleet_device_up", "gauge", "1 when the device is online (its last will not fired), else 0.",
               [({"device": d["device_id"], "target": d.get("target") or ""}, d["online"]) for d in devices])
    out.family("edgefleet_device_last_seen_timestamp_seconds", "gauge", "Unix time of the device's last message.",
               [({"device": d["device_id"]}, d.get("last_seen")) for d in devices])
    out.family("edgefleet_device_model_version", "gauge", "Version of the model active on the device.",
               [({"device": d["device_id"]}, d.get("active_version")) for d in devices])
    out.family("edgefleet_device_update_progress_ratio", "gauge", "Progress of the device's current OTA job, 0-1.",
               [({"device": d["device_id"]}, d.get("progress")) for d in devices if d["updating"]])
    out.family("edgefleet_inference_latency_seconds", "gauge",
               "Inference latency percentiles over the device's last metrics window.",
               [s for q, key in (("0.5", "latency_ms_p50"), ("0.95", "latency_ms_p95"), ("0.99", "latency_ms_p99"))
                for s in per_device(key, 1e-3, {"quantile": q})])
    out.family("edgefleet_inference_throughput_per_second", "gauge", "Inferences per second the device sustains.",
               per_device("throughput_ips"))
    out.family("edgefleet_inference_errors", "counter", "Inference errors since the agent started.",
               per_device("errors"))
    out.family("edgefleet_inference_energy_joules", "gauge",
               "Energy per inference; source is measured (power counters) or predicted (target power model).",
               [({"device": d["device_id"],
                  "source": ("measured" if str(m.get("energy_source") or "").startswith("measured") else "predicted")},
                 _scaled(m.get("energy_mj"), 1e-3)) for d in devices if (m := d["metrics"] or {})])
    out.family("edgefleet_device_memory_rss_bytes", "gauge", "Resident memory of the agent process.",
               per_device("rss_mb", 1024 * 1024))
    out.family("edgefleet_device_cpu_usage_ratio", "gauge", "CPU use of the agent process, 1 = one core.",
               per_device("cpu_percent", 0.01))
    out.family("edgefleet_device_temperature_celsius", "gauge", "Hottest thermal zone of the device.",
               per_device("temperature_c"))
    out.family("edgefleet_device_uptime_seconds", "gauge", "Seconds since the agent started.", per_device("uptime_s"))
    out.family("edgefleet_device_budget_exceeded", "gauge",
               "1 when the device's latest figure exceeds its target class's budget.",
               [({"device": d["device_id"], "budget": name}, int(name in d["budget"]["over"]))
                for d in devices if d["budget"]["status"] != "unknown" for name in BUDGET_METRICS
                if (d["budgets"] or {}).get(name) is not None])
    targets = sorted({d["target"] for d in devices if d.get("target") and d["budgets"]})
    budgets = {t: next(d["budgets"] for d in devices if d.get("target") == t) for t in targets}
    for name, unit, factor, help_text in (
            ("latency_ms", "seconds", 1e-3, "Latency budget (p95) of the target class."),
            ("peak_memory_mb", "bytes", 1024 * 1024, "Memory budget of the target class."),
            ("energy_mj", "joules", 1e-3, "Energy-per-inference budget of the target class.")):
        metric = {"latency_ms": "latency", "peak_memory_mb": "memory", "energy_mj": "energy"}[name]
        out.family(f"edgefleet_target_{metric}_budget_{unit}", "gauge", help_text,
                   [({"target": t}, _scaled(budgets[t].get(name), factor)) for t in targets])
    deployments: dict[tuple[str, str], int] = {}
    for row in view.store.db.execute("SELECT target, status, count(*) AS n FROM deployments "
                                     "WHERE status != 'in_progress' GROUP BY target, status"):
        deployments[(row["target"], row["status"])] = row["n"]
    out.family("edgefleet_deployments", "counter", "Deployments and rollbacks recorded, by target and outcome.",
               [({"target": t, "status": s}, n) for (t, s), n in sorted(deployments.items())])
    if ingest is not None:
        out.family("edgefleet_ingest_up", "gauge", "1 while this process's ingester runs, 0 after it stopped.",
                   [({}, ingest.get("up", 1))])
        out.family("edgefleet_ingest_messages", "counter", "Telemetry messages this ingester took from the broker.",
                   [({}, ingest["received"])])
        out.family("edgefleet_ingest_rows_stored", "counter", "Rows this ingester committed to the store.",
                   [({}, ingest["stored"])])
        out.family("edgefleet_ingest_messages_dropped", "counter", "Messages that were not valid protocol messages.",
                   [({}, ingest["dropped"])])
    return out.text()
