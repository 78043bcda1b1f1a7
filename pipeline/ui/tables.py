"""The tables and summary lines the commands print. Each takes plain results (report dicts, store rows, result
objects) and a ``UI``; none computes anything the result does not already hold, none imports a stage."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from . import UI


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


def print_calibration(ui: UI, result: dict[str, Any], out) -> None:
    """``targets calibrate``: the fitted op factors and how well they predict, and where they were written."""
    ui.table("Op factors (latency = overhead + factor x roofline time)", ["category", "overhead us", "factor"],
             [[c, f["overhead_us"], f["roofline_factor"]] for c, f in result["ops"].items()])
    ui.info(f"fit on {result['fit']['models']} models: median error {result['fit']['median_abs_error_pct']}%, "
            f"{result['fit']['within_10pct']:.0%} within 10%; wrote {out}")


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
    ui.table("Fleet", ["device", "class", "link", "version", "slot", "state", "last seen", "p95 ms", "RSS MB",
                       "energy mJ", "budgets"], rows, styles)


def print_retention(ui: UI, done: dict[str, int], policy) -> None:
    """``fleet retain``: what ``apply_retention`` rolled up and dropped under ``policy``."""
    ui.info(f"rolled {done['raw_rolled_up']} raw row(s) older than {policy.raw_s:g} s into "
            f"{policy.bucket_s:g} s buckets ({done['buckets_added']} new); dropped {done['rollups_dropped']} "
            f"rollup(s) and {done['events_dropped']} event(s) older than {policy.rollup_s:g} s")


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
