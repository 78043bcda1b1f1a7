"""``/metrics``: the fleet store as Prometheus metric families, one custom collector over prometheus_client.

The library owns the exposition: names (``_total`` on counters), escaping and content negotiation (the text
format, or OpenMetrics when the scraper asks for it). Naming follows Prometheus conventions: an ``edgefleet_``
prefix, base units in the name (seconds, bytes, joules, celsius, ratio). Labels are bounded by the fleet:
``device``, ``target``, ``percentile``, ``budget``, ``status``, ``source``, ``reason``, ``kind``; nothing per
request or per message, per model version only where the figure is the version's own (quality, below), and only
device ids and target names that follow the protocol's id rule become label values. Each device's figures are its
latest report; Prometheus keeps the history (the store keeps it too, for the built-in dashboard). The benchmark's
latency percentiles are the device's own (its timing of the manifest's golden vectors), hence a gauge with a
``percentile`` label, not a summary: there is no sum or count to go with them.

Real traffic through the devices' inference API (``pipeline.fleet.traffic``) is a histogram,
``edgefleet_inference_request_duration_seconds{device, target}`` over the agent's fixed buckets
(``device_agent.serving.BUCKETS_MS`` in seconds), summed over the device's model versions and agent restarts:
its counters never go backwards while the store keeps them. Beside it the requests, the errors by ``kind`` (the
API's kinds, and ``benchmark`` for the agent's own benchmark runs) and the rejected requests.

How good the model is on live traffic (``pipeline.fleet.quality``) is per device and model ``version`` (or shadowed
``candidate``), as the store keeps it: one series per version a device reported on. Drift is a gauge of the latest
scores, ``edgefleet_drift_psi{score=outputs|confidence}``, ``edgefleet_drift_mean_shift_max`` (in reference
standard deviations), ``edgefleet_drift_drifting`` (1 above a threshold, 0 within; absent while the window holds
too few samples) and the window's samples; live accuracy and the shadow comparison are counters summed over agent
restarts (``edgefleet_live_{labelled,correct}_total``, ``edgefleet_shadow_{compared,agree}_total``): accuracy
over a range is ``increase(correct) / increase(labelled)``.

How far the predictions are off (``pipeline.fleet.accuracy``) is per class, never per device: ``target``,
``basis`` (``target``: real devices against their class's prediction; ``host``: emulated agents against this
host's), ``metric`` (latency_p50, latency_p95, memory_rss), ``tolerance`` (0.1, 0.2) and ``reason``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from device_agent.protocol import ProtocolError, check_id
from device_agent.serving import BUCKETS_MS, ERROR_KINDS

from ..fleet.accuracy import TOLERANCES
from ..fleet.quality import Skip as QualitySkip
from ..fleet.traffic import Skip
from .views import BUDGET_METRICS, FleetView

PERCENTILES = (("50", "latency_ms_p50"), ("95", "latency_ms_p95"), ("99", "latency_ms_p99"))
#: store key, what, unit, factor to the unit, help
_BUDGETS = (("latency_ms", "latency", "seconds", 1e-3, "Latency budget (p95) of the target class."),
            ("peak_memory_mb", "memory", "bytes", 1024 * 1024, "Memory budget of the target class."),
            ("energy_mj", "energy", "joules", 1e-3, "Energy-per-inference budget of the target class."))


def label_safe(value: Any) -> bool:
    """A device id or target name fit to be a label value: the protocol's id rule (bounded, plain ASCII)."""
    try:
        check_id(value, "label")
    except ProtocolError:
        return False
    return True


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else float(value) * factor


def _family(kind: type, name: str, help_text: str, labels: Iterable[str],
            samples: Iterable[tuple[Iterable[Any], float | None]]) -> Metric:
    """A gauge or counter family; samples without a value (unknown) are left out."""
    family = kind(name, help_text, labels=list(labels))
    for values, value in samples:
        if value is not None:
            family.add_metric([str(v) for v in values], float(value))
    return family


def gauge(name: str, help_text: str, labels: Iterable[str], samples) -> Metric:
    return _family(GaugeMetricFamily, name, help_text, labels, samples)


def counter(name: str, help_text: str, labels: Iterable[str], samples) -> Metric:
    """``name`` without ``_total``: the library adds it."""
    return _family(CounterMetricFamily, name, help_text, labels, samples)


class FleetCollector(Collector):
    """The fleet as the store has it; ``ingest``: this process's ingester counters (``Ingester.counters()``)."""

    def __init__(self, view: FleetView, ingest: dict[str, Any] | None = None) -> None:
        self.view, self.ingest = view, ingest

    def collect(self) -> Iterator[Metric]:
        devices = [d for d in self.view.overview()["devices"] if label_safe(d["device_id"])]
        yield from self._devices(devices)
        yield from self._traffic(devices, [t for t in self.view.traffic()["devices"] if label_safe(t["device_id"])])
        yield from self._targets(devices)
        yield self._deployments()
        yield from self._predictions(self.view.predictions())
        yield from self._quality(self.view.quality())
        if self.ingest is not None:
            yield from self._ingest(self.ingest)

    @staticmethod
    def _devices(devices: list[dict[str, Any]]) -> Iterator[Metric]:
        def per_device(key: str, factor: float = 1.0):
            return [((d["device_id"],), _scaled((d["metrics"] or {}).get(key), factor)) for d in devices]

        yield gauge("edgefleet_device_up", "1 when the device is online (its last will not fired), else 0.",
                    ["device", "target"],
                    [((d["device_id"], d["target"] if label_safe(d.get("target")) else ""), d["online"])
                     for d in devices])
        yield gauge("edgefleet_device_last_seen_timestamp_seconds",
                    "Unix time (the host's clock) the device's last message was stored.", ["device"],
                    [((d["device_id"],), d.get("last_seen")) for d in devices])
        yield gauge("edgefleet_device_model_version", "Version of the model active on the device.", ["device"],
                    [((d["device_id"],), d.get("active_version")) for d in devices])
        yield gauge("edgefleet_device_update_progress_ratio", "Progress of the device's current OTA job, 0-1.",
                    ["device"], [((d["device_id"],), d.get("progress")) for d in devices if d["updating"]])
        yield gauge("edgefleet_inference_latency_seconds",
                    "Benchmark latency percentiles: the agent's timing of the manifest's golden vectors in its latest "
                    "report (real requests: edgefleet_inference_request_duration_seconds).",
                    ["device", "percentile"],
                    [((d["device_id"], p), _scaled((d["metrics"] or {}).get(key), 1e-3))
                     for p, key in PERCENTILES for d in devices])
        yield gauge("edgefleet_inference_throughput_per_second", "Inferences per second the device sustains.",
                    ["device"], per_device("throughput_ips"))
        yield gauge("edgefleet_inference_energy_joules",
                    "Energy per inference; source is measured (power counters) or predicted (target power model).",
                    ["device", "source"],
                    [((d["device_id"],
                       "measured" if str(m.get("energy_source") or "").startswith("measured") else "predicted"),
                      _scaled(m.get("energy_mj"), 1e-3)) for d in devices if (m := d["metrics"] or {})])
        yield gauge("edgefleet_device_memory_rss_bytes", "Resident memory of the agent process.", ["device"],
                    per_device("rss_mb", 1024 * 1024))
        yield gauge("edgefleet_device_cpu_usage_ratio", "CPU use of the agent process, 1 = one core.", ["device"],
                    per_device("cpu_percent", 0.01))
        yield gauge("edgefleet_device_temperature_celsius", "Hottest thermal zone of the device.", ["device"],
                    per_device("temperature_c"))
        yield gauge("edgefleet_device_uptime_seconds", "Seconds since the agent started.", ["device"],
                    per_device("uptime_s"))
        yield gauge("edgefleet_device_budget_exceeded",
                    "1 when the device's latest figure exceeds its target class's budget.", ["device", "budget"],
                    [((d["device_id"], name), int(name in d["budget"]["over"]))
                     for d in devices if d["budget"]["status"] != "unknown" for name in BUDGET_METRICS
                     if (d["budgets"] or {}).get(name) is not None])

    @staticmethod
    def _traffic(devices: list[dict[str, Any]], traffic: list[dict[str, Any]]) -> Iterator[Metric]:
        """The inference API's figures per device (``pipeline.fleet.traffic.traffic_summary``), and the errors of
        the agent's benchmark (``errors`` of its latest report) as kind ``benchmark``."""
        def target(d: dict[str, Any]) -> str:
            return d["target"] if label_safe(d.get("target")) else ""

        histogram = HistogramMetricFamily(
            "edgefleet_inference_request_duration_seconds",
            "Time the model took to answer a request of the device's inference API (requests it answered), summed "
            "over the device's model versions and agent restarts.", labels=["device", "target"])
        bounds = [*(floatToGoString(b / 1000) for b in BUCKETS_MS), "+Inf"]
        for t in traffic:
            cumulative, buckets = 0, []
            for bound, n in zip(bounds, t["buckets"]):
                cumulative += n
                buckets.append((bound, cumulative))
            histogram.add_metric([t["device_id"], target(t)], buckets, t["sum_ms"] / 1000)
        yield histogram
        yield counter("edgefleet_inference_requests",
                      "Requests the device's inference API received, answered or not (answered: the histogram's "
                      "count; the rest are errors).", ["device", "target"],
                      [((t["device_id"], target(t)), t["requests"]) for t in traffic])
        errors = [((t["device_id"], target(t), kind), t["errors"].get(kind, 0))
                  for t in traffic for kind in ERROR_KINDS]
        errors += [((d["device_id"], target(d), "benchmark"), (d["metrics"] or {}).get("errors")) for d in devices]
        yield counter("edgefleet_inference_errors",
                      "Failed inferences by kind: the inference API's (bad_request, too_large, overloaded, deadline, "
                      "no_model, runtime), and benchmark (the agent's own benchmark runs, since it started).",
                      ["device", "target", "kind"], errors)
        yield counter("edgefleet_inference_rejected",
                      "Requests the device's inference API turned away because its queue or connections were full "
                      "(503).", ["device", "target"], [((t["device_id"], target(t)), t["rejected"]) for t in traffic])

    @staticmethod
    def _targets(devices: list[dict[str, Any]]) -> Iterator[Metric]:
        budgets: dict[str, dict[str, Any]] = {}
        for d in devices:
            if d.get("budgets") and label_safe(d.get("target")):
                budgets.setdefault(d["target"], d["budgets"])
        for key, what, unit, factor, help_text in _BUDGETS:
            yield gauge(f"edgefleet_target_{what}_budget_{unit}", help_text, ["target"],
                        [((t,), _scaled(b.get(key), factor)) for t, b in sorted(budgets.items())])

    def _deployments(self) -> Metric:
        rows = self.view.store.db.execute("SELECT target, status, count(*) AS n FROM deployments "
                                          "WHERE status != 'in_progress' GROUP BY target, status "
                                          "ORDER BY target, status")
        return counter("edgefleet_deployments", "Deployments and rollbacks recorded, by target and outcome.",
                       ["target", "status"], [((r["target"], r["status"]), r["n"]) for r in rows])

    @staticmethod
    def _predictions(check: dict[str, Any]) -> Iterator[Metric]:
        rows = [c for c in check["classes"] if label_safe(c["target"])]

        def per_class(key: str):
            return [((c["target"], c["basis"], c["metric"]), c[key]) for c in rows]

        labels = ["target", "basis", "metric"]
        yield gauge("edgefleet_prediction_error_ratio",
                    "Median relative error of the predictions for the class, (measured - predicted) / predicted, over "
                    "one comparison per device and model version; basis: target (real devices against the class's "
                    "prediction) or host (emulated agents against this host's).", labels, per_class("median_error"))
        yield gauge("edgefleet_prediction_within_tolerance_ratio",
                    "Share of the class's comparisons whose relative error is within the tolerance (0.1: +-10%).",
                    [*labels, "tolerance"],
                    [((c["target"], c["basis"], c["metric"], f"{t:g}"), c[f"within_{round(t * 100)}pct"])
                     for c in rows for t in TOLERANCES])
        yield gauge("edgefleet_prediction_devices", "Devices whose reports were compared with the predictions.",
                    labels, per_class("devices"))
        yield gauge("edgefleet_prediction_samples", "Metrics reports behind the comparisons (the latest per device "
                    "and version).", labels, per_class("samples"))
        yield gauge("edgefleet_prediction_skipped_samples",
                    "Reports not compared, by reason: unpredicted (no prediction recorded for the class, version and "
                    "basis), invalid (the value is missing, zero, negative or not finite).", [*labels, "reason"],
                    [((c["target"], c["basis"], c["metric"], r), n) for c in rows for r, n in c["skipped"].items()])

    @staticmethod
    def _quality(quality: dict[str, Any]) -> Iterator[Metric]:
        """Drift, live accuracy and shadow comparisons per device (``pipeline.fleet.quality.quality_summary``)."""
        devices = [d for d in quality["devices"] if label_safe(d["device_id"])]
        drift = [((d["device_id"], d["target"] if label_safe(d.get("target")) else "", str(v["version"])), v["drift"])
                 for d in devices for v in d["versions"] if v["drift"]]
        yield gauge("edgefleet_drift_psi",
                    "Population stability index of the version's live answers against its reference data over the "
                    "device's window: score outputs (predicted-class shares) or confidence (top-1 confidence "
                    "histogram); above 0.25 a significant shift.", ["device", "target", "version", "score"],
                    [((*labels, score), s[f"psi_{score}"]) for labels, s in drift
                     for score in ("outputs", "confidence")])
        yield gauge("edgefleet_drift_mean_shift_max",
                    "Largest standardised shift of an input channel's live mean from the reference's, in reference "
                    "standard deviations, over the device's window.", ["device", "target", "version"],
                    [(labels, s["max_mean_shift"]) for labels, s in drift])
        yield gauge("edgefleet_drift_window_samples", "Samples the device's drift window holds.",
                    ["device", "target", "version"], [(labels, s["samples"]) for labels, s in drift])
        yield gauge("edgefleet_drift_drifting",
                    "1 when a drift score is above its threshold (deploy.yaml drift:), 0 when none is; absent while "
                    "the window holds fewer than min_samples samples.", ["device", "target", "version"],
                    [(labels, {"drifting": 1, "ok": 0}.get(s["state"])) for labels, s in drift])
        accuracy = [((d["device_id"], str(v["version"])), v["accuracy"])
                    for d in devices for v in d["versions"] if v["accuracy"]]
        yield counter("edgefleet_live_labelled", "Answers of the version the device's application labelled (posted "
                      "the true class of), summed over agent restarts.", ["device", "version"],
                      [(labels, a["labelled"]) for labels, a in accuracy])
        yield counter("edgefleet_live_correct", "Labelled answers of the version whose top-1 class was the label.",
                      ["device", "version"], [(labels, a["correct"]) for labels, a in accuracy])
        shadow = [((d["device_id"], str(s["candidate"])), s) for d in devices for s in d["shadow"]]
        yield counter("edgefleet_shadow_compared", "Live requests the shadowed candidate answered beside the active "
                      "model, summed over agent restarts.", ["device", "candidate"],
                      [(labels, s["compared"]) for labels, s in shadow])
        yield counter("edgefleet_shadow_agree", "Compared requests whose top-1 class the candidate and the active "
                      "model agreed on (classifiers only).", ["device", "candidate"],
                      [(labels, s["agree"]) for labels, s in shadow])

    @staticmethod
    def _ingest(ingest: dict[str, Any]) -> Iterator[Metric]:
        yield gauge("edgefleet_ingest_up", "1 while this process's ingester runs, 0 after it stopped.", [],
                    [((), ingest.get("up", 1))])
        yield counter("edgefleet_ingest_messages", "Telemetry messages this ingester took from the broker.", [],
                      [((), ingest["received"])])
        yield counter("edgefleet_ingest_rows_stored", "Rows this ingester committed to the store.", [],
                      [((), ingest["stored"])])
        yield counter("edgefleet_ingest_dropped_messages",
                      "Messages this ingester skipped, by reason: topic, device_id, size, json, schema, store, "
                      "internal.", ["reason"], sorted(((r,), n) for r, n in ingest.get("dropped", {}).items()))
        yield counter("edgefleet_ingest_traffic_skipped",
                      "Traffic values (in stored metrics messages) this ingester left out, by reason: "
                      + ", ".join(s.value for s in Skip) + ".", ["reason"],
                      sorted(((r,), n) for r, n in ingest.get("traffic_skipped", {}).items()))
        yield counter("edgefleet_ingest_quality_skipped",
                      "Drift, live accuracy and shadow values (in stored metrics messages) this ingester left out, by "
                      "reason: " + ", ".join(s.value for s in QualitySkip) + ".", ["reason"],
                      sorted(((r,), n) for r, n in ingest.get("quality_skipped", {}).items()))


def render(view: FleetView, ingest: dict[str, Any] | None = None, accept: str = "") -> tuple[bytes, str]:
    """The exposition and its content type, in the format the scraper's ``Accept`` header asks for."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(view, ingest))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
