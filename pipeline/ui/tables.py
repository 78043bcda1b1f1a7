"""The tables and summary lines the commands print. Each takes plain results (report dicts, store rows, result
objects) and a ``UI``; none computes anything the result does not already hold, none imports a stage."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

from . import UI

#: the delivery status of a device that runs the new model (``pipeline.ota.status.DeviceStatus.ACTIVATED``)
ACTIVATED = "activated"


def print_layers(ui: UI, report: dict[str, Any]) -> None:
    """``compress``: each layer after compression, then dense against compressed."""
    rows = [[l["layer"], l["type"], "x".join(map(str, l["shape"])), f"{l['sparsity']:.1%}",
             f"{l['channels_nonzero']}/{l['channels']}"] for l in report["layers"]]
    ui.table("Layers after compression", ["layer", "type", "shape", "sparsity", "channels kept"], rows)
    o = report["onnx"]
    ui.table("Summary", ["", "dense", "compressed", "ratio"], [
        ["parameters", f"{report['params_before']:,}", f"{report['params']:,}",
         f"{report['params_before'] / report['params']:.2f}x"],
        ["nonzero parameters", f"{report['params_before']:,}", f"{report['nonzero_params']:,}",
         f"{1 / report['kept_fraction']:.2f}x"],
        ["MACs", f"{report['macs_before']:,}", f"{report['macs']:,}", f"{report['mac_ratio']:.2f}x"],
        ["ONNX bytes", f"{o['size']['dense']['bytes']:,}", f"{o['size']['compressed']['bytes']:,}",
         f"{o['size_ratio']:.2f}x"],
        ["ONNX gzip bytes", f"{o['size']['dense']['gzip_bytes']:,}", f"{o['size']['compressed']['gzip_bytes']:,}",
         f"{o['gzip_size_ratio']:.2f}x"],
        [f"latency ms ({o['threads']} thread)", o["latency_ms"]["dense"], o["latency_ms"]["compressed"],
         f"{o['speedup']:.2f}x"],
        ["test accuracy", f"{report['accuracy_before']:.2%}", f"{report['accuracy_after']:.2%}",
         f"{(report['accuracy_after'] - report['accuracy_before']) * 100:+.2f} pt"],
    ])


def print_history(ui: UI, rows: list[dict[str, Any]]) -> None:
    """``history``: store deployments, each with its ``devices`` (the store's device results)."""
    ui.table("Deployments", ["when", "target", "kind", "version", "status", "devices", "reason"],
             [[dt.datetime.fromtimestamp(r["ts"]).strftime("%Y-%m-%d %H:%M:%S"), r["target"], r["kind"],
               r["version"], r["status"], ", ".join(f"{d['device_id']}={d['status']}" for d in r["devices"]),
               (r["reason"] or "")[:50]] for r in rows])


def print_targets(ui: UI, profiles: list) -> None:
    """``targets``: one row per ``TargetProfile``."""
    ui.table("Targets", ["name", "description", "cores", "GFLOP/s fp32", "RAM MB", "runtimes"],
             [[p.name, p.description, p.cpu.cores, p.cpu.peak_gflops_fp32, p.memory.ram_mb, ", ".join(p.runtimes)]
              for p in profiles])


#: the calibration statuses of a device that sent ``finished`` (``pipeline.ota.calibration.FINISHED``)
CALIBRATION_FINISHED = ("finished", "stopped")


def print_calibration(ui: UI, report: dict[str, Any]) -> None:
    """``targets calibrate``: per device what it timed and how it ended, the fits' errors, and what was written."""
    rows = []
    for d in report["devices"]:
        env = d.get("env") or {}
        rows.append([d["device_id"], d["status"], f"{d['cases']}/{d['total'] or report['suite']['cases']}",
                     f"{d['wall_s']:.0f}" if d.get("wall_s") else "-", env.get("agent_version") or "-",
                     f"{env.get('runtime') or '-'} {env.get('runtime_version') or ''}".strip(),
                     (env.get("cpu") or "-")[:32], d["refused_messages"], (d.get("reason") or "")[:60]])
    ui.table(f"Calibration of {report['target']} ({report['suite']['cases']} cases)",
             ["device", "status", "cases", "time s", "agent", "runtime", "cpu", "refused msgs", "reason"], rows,
             ["green" if d["status"] == "finished" else ("yellow" if d["status"] in CALIBRATION_FINISHED
                                                         else "bold red") for d in report["devices"]])
    k = report.get("kernel_fit") or {}
    if k.get("models"):
        ui.info(f"kernel predictor: {k['kernels']} kernels; on {k['models']} whole models median error "
                f"{k['median_abs_error_pct']}%, {k['within_10pct']:.0%} within 10%")
    o = report.get("op_fit") or {}
    if o.get("models"):
        ui.info(f"op factors: on {o['models']} whole models median error {o['median_abs_error_pct']}%, "
                f"{o['within_10pct']:.0%} within 10%")
    if report.get("peaks"):
        p = report["peaks"]
        ui.info("measured peaks: " + ", ".join(f"{v:g} {unit}" for key, unit in (
            ("gflops_fp32", "GFLOP/s fp32"), ("gops_int8", "GOP/s int8"), ("bandwidth_gbs", "GB/s")) if (v := p.get(key))))
    for what, path in (report.get("written") or {}).items():
        ui.info(f"wrote {path}")
    if report["unfinished"]:
        ui.warn(f"did not finish: {', '.join(report['unfinished'])} (what they sent is in the fit)")


def _pct(v: float | None, fmt: str = ".0%") -> str:
    return "-" if v is None else format(v, fmt)


def print_refit(ui: UI, report: dict[str, Any]) -> None:
    """``targets calibrate --from-fleet``: per fleet model what it measured and what the old and the refit
    predictor say, the rows the fit used, the errors of both, and what was written."""
    ui.table(f"Fleet models of {report['target']}", ["deployed to", "version", "devices", "reports", "measured ms",
                                                     "old ms", "refit ms"],
             [[m["target"], m["version"], len(m["devices"]), m["samples"], m["measured_ms"], m["old_ms"],
               m["refit_ms"]] for m in report["models"]])
    r = report["rows"]
    ui.info(f"rows: {r['suite_kernels']} suite kernels and {r['suite_models']} suite models (v{report['version']}), "
            f"{r['fleet_models']} fleet model(s) carrying {report['share']:.0%} of the whole-model fit")
    for what, errors in (("fleet models", report["fleet"]), ("suite models", report["suite_models"])):
        ui.table(f"Error on the {what}: (measured - predicted) / predicted", ["predictor", "models", "median",
                                                                            "median |error|", "±10%", "±20%"],
                 [[name, f"{e['models']}" + (f" (+{e['unpredicted']} at 0 ms)" if e.get("unpredicted") else ""),
                   _pct(e["median_error"], "+.1%"),
                   "-" if e["median_abs_error_pct"] is None else f"{e['median_abs_error_pct']}%",
                   _pct(e["within_10pct"]), _pct(e["within_20pct"])] for name, e in errors.items()])
    for path in (report.get("written") or {}).values():
        ui.info(f"wrote {path} (basis from_fleet)")


def print_calibrations(ui: UI, rows: list[dict[str, Any]]) -> None:
    """``fleet status``: each class's latest calibration as the fleet store recorded it
    (``pipeline.fleet.accuracy.latest_calibrations``), then where each class's kernels file is."""
    if not rows:
        ui.info("calibrations: none recorded (pipeline targets calibrate --target T)")
        return
    out = []
    for c in rows:
        fit, samples = c.get("fit") or {}, c.get("samples") or {}
        suite = samples.get("suite") if isinstance(samples.get("suite"), dict) else {}
        fleet = samples.get("fleet") if isinstance(samples.get("fleet"), dict) else {}
        error = fit.get("median_abs_error_pct")
        out.append([c["target"], c["basis"], c["date"] or "-", len(c.get("devices") or []),
                    f"{sum(v for v in suite.values() if isinstance(v, int))} + {len(fleet)}",
                    "-" if error is None else f"{error}% ({fit.get('models')} {fit.get('on') or ''})".strip(),
                    _pct(fit.get("within_10pct"))])
    ui.table("Calibrations (latest per class)", ["class", "basis", "date", "devices", "suite cases + fleet models",
                                                 "median |error|", "±10%"], out)
    for c in rows:
        ui.info(f"{c['target']} v{c['version']}: {c['kernels_file'] or 'no kernels file written'}")


def print_broker_config(ui: UI, made: dict[str, Any], devices: list[str], port: int) -> None:
    """``broker config``: the files written and how to run the broker on them."""
    ui.info(f"wrote {made['config']} (TLS on port {port}, client certificates required) and {made['acl']}")
    ui.info(f"CA {made['ca']}; host identity {made['host'].cert}; {len(devices)} device identit"
            f"{'y' if len(devices) == 1 else 'ies'}: {', '.join(devices) or '(none: pass --device ID)'}")
    ui.info(f"run it: mosquitto -c {made['config']}")


def print_fleet(ui: UI, devices: list[dict[str, Any]]) -> None:
    """``fleet status``: the dashboard's overview devices, red when offline or over a budget."""
    rows, styles = [], []
    for d in devices:
        m = d["metrics"] or {}
        seen = dt.datetime.fromtimestamp(d["last_seen"]).strftime("%H:%M:%S") if d["last_seen"] else "-"
        state = d.get("state") or "-"
        if d["updating"] and d.get("progress") is not None:
            state += f" v{d['job_version']} {d['progress']:.0%}"
        b = d["budget"]
        rows.append([d["device_id"], d.get("target") or "-", "online" if d["online"] else "offline",
                     d.get("active_version") or "-", d.get("slot") or "-", state, seen,
                     m.get("latency_ms_p95", "-"), m.get("rss_mb", "-"), m.get("energy_mj", "-"),
                     "over: " + ", ".join(b["over"]) if b["over"] else b["status"]])
        styles.append("red" if b["over"] or not d["online"] else None)
    ui.table("Fleet", ["device", "class", "link", "version", "slot", "state", "last seen", "bench p95 ms", "RSS MB",
                       "energy mJ", "budgets"], rows, styles)
    if rows:
        ui.info("bench p95: the agent's benchmark on the model's golden vectors; real requests are under Traffic")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def print_traffic(ui: UI, traffic: dict[str, Any]) -> None:
    """``fleet status``: what the devices' applications asked of their models through the inference API
    (``pipeline.fleet.traffic.traffic_summary``), one row per device and version, red where requests failed."""
    rows, styles = [], []
    for d in traffic["devices"]:
        for i, v in enumerate(d["versions"]):
            errors = ", ".join(f"{k} {n}" for k, n in v["errors"].items())
            rows.append([d["device_id"] if i == 0 else "", "none" if v["version"] is None else v["version"],
                         v["requests"], v["answered"], _ms(v["p50_ms"]), _ms(v["p95_ms"]), _ms(v["p99_ms"]),
                         f"{v['errors_total']} ({errors})" if errors else 0,
                         d["rejected"] if i == 0 else "", _ms(d["queue_peak"]) if i == 0 else ""])
            styles.append("red" if v["errors_total"] else None)
    if not rows:
        ui.info("traffic: no device has reported requests to its inference API yet")
        return
    ui.table("Traffic (requests to each device's inference API, summed over agent restarts)",
             ["device", "version", "requests", "answered", "p50 ms", "p95 ms", "p99 ms", "errors", "rejected",
              "queue peak"], rows, styles)
    ui.info("p50/p95/p99: the upper bound of the latency bucket each falls in; version none: requests no model "
            "answered")


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _score(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _drift_state(drift: dict[str, Any] | None, values: bool) -> str:
    """``ok``, ``collecting (n/min samples)``, or ``drifting: score[ value > threshold], ...``."""
    if drift is None:
        return "-"
    if drift["state"] == "collecting":
        return f"collecting ({drift['samples']}/{drift['thresholds']['min_samples']} samples)"
    if drift["state"] == "drifting":
        return "drifting: " + ", ".join(e["score"] + (f" {e['value']:.3g} > {e['threshold']:g}" if values else "")
                                        for e in drift["drifting"])
    return drift["state"]


def _when(ts: Any) -> str:
    """A device's timestamp (its own clock: any number) as local time, or as it is when no date has it."""
    try:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ts)


def _accuracy(acc: dict[str, Any] | None) -> str:
    return "-" if acc is None else f"{_share(acc['accuracy'])} of {acc['labelled']}"


def _quality_rows(quality: dict[str, Any], full: bool) -> tuple[list[list[Any]], list[str | None]]:
    rows, styles = [], []
    for d in quality["devices"]:
        for i, v in enumerate(d["versions"]):
            s = v["drift"] or {}
            row = [d["device_id"] if i == 0 else "", v["version"], _drift_state(v["drift"], values=not full)]
            if full:
                row += [_score(s.get("psi_outputs")), _score(s.get("psi_confidence")), _score(s.get("max_mean_shift")),
                        f"{s['samples']}/{s['window']}" if s else "-"]
            rows.append([*row, _accuracy(v["accuracy"])])
            styles.append("red" if s.get("state") == "drifting" else None)
    return rows, styles


def _print_shadow(ui: UI, quality: dict[str, Any], full: bool) -> None:
    rows = []
    for d in quality["devices"]:
        for s in d["shadow"]:
            row = [d["device_id"], s["candidate"], s["active"] if s["active"] is not None else "-", s["compared"],
                   _share(s["agreement"]) if s["top1"] else f"distance max {_score(s['max_distance'])}",
                   _ms(s["active_p50_ms"]), _ms(s["candidate_p50_ms"])]
            if full:
                row += [s["offered"], s["dropped"], s["errors"], _score(s["mean_distance"])]
            rows.append(row)
    if rows:
        ui.table("Shadow (a candidate run beside the active model on sampled live requests)",
                 ["device", "candidate", "active", "compared", "agreement", "active p50 ms", "candidate p50 ms",
                  *(["offered", "dropped", "errors", "mean distance"] if full else [])], rows)


def print_quality(ui: UI, quality: dict[str, Any]) -> None:
    """``fleet status``: per device and version the drift state and live accuracy, then any shadow comparison
    (``pipeline.fleet.quality.quality_summary``; ``fleet drift`` has the scores), red where the model drifts."""
    rows, styles = _quality_rows(quality, full=False)
    if rows:
        ui.table("Quality on live traffic", ["device", "version", "drift", "live accuracy"], rows, styles)
        counts = quality["counts"]
        ui.info(f"drift: {counts['drifting']} device version(s) drifting, {counts['ok']} ok, {counts['collecting']} "
                "collecting; the scores: pipeline fleet drift")
    elif not any(d["shadow"] for d in quality["devices"]):
        ui.info("quality: no device has reported drift, live accuracy or a shadow comparison yet")
    _print_shadow(ui, quality, full=False)


def print_drift(ui: UI, quality: dict[str, Any]) -> None:
    """``fleet drift``: per device and version the drift scores over the device's window, their state, live
    accuracy; the shadow comparisons; the latest drift events."""
    rows, styles = _quality_rows(quality, full=True)
    if rows:
        ui.table("Drift and live accuracy", ["device", "version", "state", "PSI outputs", "PSI confidence",
                                             "max mean shift", "samples/window", "live accuracy"], rows, styles)
        ui.info("PSI above 0.1: a moderate shift, above 0.25 significant; mean shift in reference standard "
                "deviations; live accuracy: the application's labels, summed over agent restarts")
    else:
        ui.info("drift: no device has reported drift scores or live accuracy yet")
    _print_shadow(ui, quality, full=True)
    if quality.get("events"):
        ui.table("Drift events", ["when", "device", "event", "message"],
                 [[_when(e["ts"]), e["device_id"], e["kind"], e["message"] or ""] for e in quality["events"]],
                 ["red" if e["kind"] == "drift_detected" else None for e in quality["events"]])


#: what a comparison's basis means, as the table says it
COMPARED_WITH = {"target": "{target}'s", "host": "host's (emulated)"}
METRIC_NAMES = {"latency_p50": "latency p50", "latency_p95": "latency p95", "memory_rss": "RSS / peak mem"}


def print_predictions(ui: UI, check: dict[str, Any]) -> None:
    """``fleet status``: the fleet's measurements against their predictions per class
    (``pipeline.fleet.accuracy.prediction_check``), red where the median error is beyond the widest tolerance. A
    row whose reports all lack a recorded prediction (deployed before predictions were stored) is left out;
    the line under the table counts them."""
    rows, styles = [], []
    widest = max(check["tolerances"])

    def share(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for c in check["classes"]:
        if not c["comparisons"] and not c["skipped"]["invalid"]:
            continue
        rows.append([c["target"] or "-", COMPARED_WITH[c["basis"]].format(target=c["target"]),
                     METRIC_NAMES.get(c["metric"], c["metric"]), c["versions"], c["devices"], c["samples"],
                     share(c["median_error"], "+.1%"), share(c["within_10pct"], ".0%"),
                     share(c["within_20pct"], ".0%"), sum(c["skipped"].values())])
        styles.append("red" if c["median_error"] is not None and abs(c["median_error"]) > widest else None)
    if rows:
        ui.table("Predictions against the fleet", ["class", "prediction", "metric", "versions", "devices", "reports",
                                                   "median error", "±10%", "±20%", "skipped"], rows, styles)
        ui.info(f"error = {check['error']} per device and version (the median of its latest {check['per_series']} "
                "reports); emulated agents run on this host: they meet the host's")
    else:
        ui.info("predictions against the fleet: no device has reported on a model deployed with its predictions yet")
    skipped = {reason: sum(c["skipped"][reason] for c in check["classes"]) for reason in ("unpredicted", "invalid")}
    if any(skipped.values()):
        ui.info(f"not compared: {skipped['unpredicted']} reported figure(s) with no prediction recorded for their "
                f"class and version (deployed before predictions were stored, or not from this host), "
                f"{skipped['invalid']} missing, zero, negative or not finite")


def print_retention(ui: UI, done: dict[str, int], policy) -> None:
    """``fleet retain``: what ``apply_retention`` rolled up and dropped under ``policy``."""
    ui.info(f"rolled {done['raw_rolled_up']} raw row(s) older than {policy.raw_s:g} s into "
            f"{policy.bucket_s:g} s buckets ({done['buckets_added']} new); dropped {done['rollups_dropped']} "
            f"rollup(s) and {done['events_dropped']} event(s) older than {policy.rollup_s:g} s")
    if done.get("traffic_boots_folded") or done.get("traffic_rows_dropped"):
        ui.info(f"traffic: folded {done['traffic_boots_folded']} earlier agent boot(s) into their device's totals, "
                f"dropped {done['traffic_rows_dropped']} row(s) not updated within {policy.rollup_s:g} s")


def print_provisioned(ui: UI, results: list, seconds: float) -> None:
    """``provision``: one row per ``HostResult``, red when it failed."""
    failed = [r for r in results if r.status == "failed"]
    ui.table(f"Provisioned {len(results) - len(failed)}/{len(results)} in {seconds:.0f} s",
             ["device", "host", "result", "agent", "was", "runtime", "service", "device", "time"],
             [[r.device_id, r.where, r.status, r.agent_version or "-", r.previous_version or "-", r.runtime or "-",
               r.service or "-", f"{r.machine or '?'} py{r.python or '?'}", f"{r.seconds:.0f} s"] for r in results],
             ["red" if r.status == "failed" else None for r in results])


def print_devices(ui: UI, rows: list[dict[str, Any]]) -> None:
    """``devices``: the inventory beside what the broker (or the store) says, red when offline."""
    ui.table("Devices (inventory: deploy.yaml fleet.devices; state: the broker, else the fleet store)",
             ["device", "class", "host", "groups", "link", "agent", "model", "state", "in inventory"],
             [[r["device_id"], r["target"] or "-", r["host"] or "-", ",".join(r["groups"]) or "-",
               {True: "online", False: "offline", None: "unknown"}[r["online"]], r["agent_version"] or "-",
               r["active_version"] or "-", r["state"] or "-", "yes" if r["in_inventory"] else "no"] for r in rows],
             ["red" if r["online"] is False else None for r in rows])


class ProvisionProgress:
    """``provision`` while it runs: a live table on a terminal; one line per step otherwise (CI logs). Called
    with each ``HostResult`` as a host moves on; a context manager around the run."""

    def __init__(self, ui: UI, plans) -> None:
        self.ui, self.lock = ui, threading.Lock()
        self.rows = {p.device_id: [p.device_id, p.where, "waiting", "", ""] for p in plans}
        self.live = None
        if ui.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=ui.console, refresh_per_second=4)

    def _table(self):
        from rich.table import Table

        t = Table(title="Provisioning", title_justify="left")
        for c in ("device", "host", "step", "agent", "time"):
            t.add_column(c)
        for row in self.rows.values():
            t.add_row(*row, style="red" if row[2] == "failed" else ("green" if row[2] == "done" else None))
        return t

    def __call__(self, r) -> None:
        with self.lock:
            row = self.rows[r.device_id]
            changed = row[2] != r.step
            row[2:] = [r.step, r.agent_version or "", f"{r.seconds:.0f} s" if r.seconds else ""]
            if self.live is not None:
                self.live.update(self._table())
            elif changed:
                self.ui.info(f"{r.device_id} ({r.where}): {r.step}" + (f": {r.error}" if r.error else ""))

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)


def print_profile(ui: UI, prof, target) -> None:
    """``profile`` and ``deploy``: the static figures, the prediction for the target, what this host measured,
    and the budgets table."""
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


def print_delivery(ui: UI, delivery: list[dict[str, Any]], predicted: dict[str, Any],
                    limits: dict[str, Any] | None = None) -> None:
    """One row per device: its status as the device said it (or ``timeout`` / ``no_answer`` when it said
    nothing), what it measured, and what was predicted for the target and, for emulated agents, for this host."""
    host_ms = (limits or {}).get("host_predicted_latency_ms")
    basis = (limits or {}).get("host_latency_basis") or "predicted"  # measured by the profile stage, or predicted
    emulated = any((d.get("metrics") or {}).get("emulated") for d in delivery)
    rows = []
    for d in delivery:
        m = d.get("metrics") or {}
        rows.append([d["device_id"], str(d["status"]), d["active_version"],
                     f"{m['latency_ms_p50']:.3f}" if m else "-", f"{m['latency_ms_p95']:.3f}" if m else "-",
                     f"{m['rss_mb']:.1f}" if m else "-", f"{predicted['latency_ms']:.3f}",
                     *([f"{host_ms:.3f}" if host_ms is not None and m.get("emulated") else "-"] if emulated else []),
                     d.get("reason") or ""])
    expected = "this model's latency measured on this host by the profile" if basis == "measured" else \
        "the prediction for this host"
    ui.table("Delivery" + (f" (p50/p95/RSS measured on this host by emulated agents, judged against {expected}, "
                           "not the target's budget)" if emulated else ""),
             ["device", "status", "version", "p50 ms", "p95 ms", "RSS MB", "target predicted ms",
              *([f"host {basis} ms"] if emulated else []), "reason"], rows,
             ["green" if d["status"] == ACTIVATED else "bold red" for d in delivery])


def print_fit(ui: UI, fit, target) -> None:
    """``fit`` and ``deploy`` with fit enabled: every candidate, the Pareto front and the choice."""
    rows, styles = [], []
    for c in sorted(fit.candidates, key=lambda c: (c.error is not None, -c.accuracy)):
        if c.error:
            rows.append([c.label, c.quantize, "-", "-", "-", "-", "-", "", c.error[:60]])
            styles.append("dim")
            continue
        f = c.figures
        rows.append([c.label, c.quantize, f"{c.accuracy:.2%}", f"{f['latency_ms']:.3f}", f"{f['peak_memory_mb']:.1f}",
                     f"{f['model_size_mb']:.3f}", f"{f['energy_mj']:.3f}", "yes" if c.pareto else "",
                     "fits" if c.passed else "; ".join(x.split(":")[0] for x in c.failures)])
        styles.append("bold green" if c is fit.best else ("green" if c.passed else "red"))
    ui.table(f"Fit to {target.name} (predicted figures)", ["compression", "quantize", "accuracy", "latency ms",
                                                           "memory MB", "size MB", "energy mJ", "Pareto", "budgets"],
             rows, styles)
    if fit.best:
        ui.info(f"chosen: {fit.best.label} + {fit.best.quantize} ({fit.best.accuracy:.2%}); plot: {fit.plot}")


def print_quantized(ui: UI, report: dict[str, Any]) -> None:
    """``quantize``: the original against the quantized file."""
    q, m = report["quantization"], report["model"]
    ui.table(f"{Path(m['path']).name} quantized ({q['kind']})", ["", "original", "quantized"], [
        ["bytes", f"{q['size_fp32_bytes']:,}", f"{q['size_quantized_bytes']:,}"],
        ["accuracy", f"{q['accuracy_fp32']:.2%}", f"{q['accuracy_quantized']:.2%}"],
        ["SQNR dB", "", f"{q['sqnr_db']}"],
    ])
    ui.info(f"written: {report['path']}")
