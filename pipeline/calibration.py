"""``pipeline targets calibrate --target T``: calibrate a device class from its own devices, one stage after the
other.

build the suite (profile/calibrate/build) -> sign it as a ``calibration`` artifact (bundle) -> open the fleet (the
class's devices on the fleet's broker; for ``host``, a local agent process on a local broker, as deploy starts
them) -> deliver it and collect the timings (ota/calibration) -> fit and write the class's predictor with its
provenance (profile/calibrate) -> record the run in the fleet store (fleet/accuracy). This module only sequences
those calls and assembles the report.

``--from-fleet`` (:func:`refit_from_fleet`) ships nothing: the latest stored suite results and the fleet store's
measurements of the class's deployed models (fleet/accuracy) -> the refit (profile/calibrate/refit) -> written and
recorded as above.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.calibration import SUITE_FILE
from device_agent.config import BrokerConfig
from device_agent.errors import ProtocolError
from device_agent.protocol import check_id
from device_agent.storage import atomic_write_bytes

from .config import FleetConfig
from .errors import ConfigError, DeliveryError, StoreError
from .fleet import STORE_ERRORS, FleetStore, exists, redact
from .profile import HOST, host_threads
from .targets import TargetProfile
from .ui import UI


def class_devices(fleet: FleetConfig, db: Path | str, target: str) -> list[str]:
    """The devices of class ``target``: deploy.yaml's inventory entries of that class, and the devices the fleet
    store has heard report that class; those online first, then the most recently seen."""
    seen: dict[str, dict[str, Any]] = {}
    if exists(db):

        store = FleetStore(db)
        try:
            seen = {d["device_id"]: d for d in store.devices()}
        finally:
            store.close()
    ids = [d.id for d in fleet.devices if d.target == target]
    ids += [d for d, row in seen.items() if row.get("target") == target and d not in ids]
    return sorted(ids, key=lambda d: (not (seen.get(d) or {}).get("online"), -((seen.get(d) or {}).get("last_seen") or 0)))


def choose_devices(fleet: FleetConfig, db: Path | str, target: str, device_ids: list[str] | None,
                   count: int | None) -> list[str]:
    """``device_ids`` as given (each checked as a topic level), else the first ``count`` of the class (all of them
    by default). Asking for more than the class has, or a class with none, is an error that says where we looked."""
    if device_ids:
        for d in device_ids:
            try:
                check_id(d, "--device")
            except ProtocolError as exc:
                raise ConfigError(str(exc)) from None
        return list(dict.fromkeys(device_ids))
    known = class_devices(fleet, db, target)
    where = f"deploy.yaml's fleet.devices and the fleet store ({redact(db)})"
    if not known:
        raise DeliveryError(f"no devices of class {target}: {where} name none; pass --device ID, or provision devices "
                            f"of that class (pipeline provision)")
    if count is not None and count > len(known):
        raise ConfigError(f"--devices {count}: class {target} has {len(known)} known device(s) ({', '.join(known)}) "
                          f"in {where}")
    return known[:count] if count is not None else known


def _progress(ui: UI) -> Callable[[Any], None]:
    """One line when a device's state moves, or every tenth of its suite."""
    last: dict[str, tuple[str, int]] = {}

    def show(d) -> None:
        step = (10 * d.done // d.total) if d.total else 0
        if last.get(d.device_id) == (d.status.value, step):
            return
        last[d.device_id] = (d.status.value, step)
        counts = f" {d.done}/{d.total} cases" if d.total else ""
        ui.info(f"{d.device_id}: {d.status.value}{counts}" + (f" ({d.reason})" if d.reason else ""))

    return show


def _provenance(run, built, target: TargetProfile, wall_s: float) -> dict[str, Any]:
    measured = [d for d in run.devices if d.results]
    envs = {d.device_id: d.env for d in measured}

    def each(key: str) -> dict[str, Any]:
        return {d: e.get(key) for d, e in envs.items()}

    return {"target": target.name, "devices": [d.device_id for d in measured], "date": dt.date.today().isoformat(),
            "time": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "agent_versions": each("agent_version"), "runtime": each("runtime"),
            "runtime_versions": each("runtime_version"), "cpu": each("cpu"), "machine": each("machine"),
            "threads": built.suite.threads, "samples": {d.device_id: len(d.results) for d in measured},
            "unfinished": run.unfinished, "suite": built.to_dict(), "job_id": run.job_id,
            "device_wall_s": {d.device_id: d.wall_s for d in measured}, "wall_s": round(wall_s, 1)}


def run_calibration(fleet: FleetConfig, external: BrokerConfig | None, target: TargetProfile, workdir: Path,
                    key_dir: Path, ui: UI, *, device_ids: list[str] | None = None, count: int | None = None,
                    timeout_s: float | None = None, scale: float = 1.0, budget_s: float | None = None
                    ) -> dict[str, Any]:
    """Calibrate ``target`` from its devices (``device_ids``, or ``count`` of the class; for ``host`` without ids,
    ``count`` local agents, one by default). ``timeout_s``: how long to wait for the devices (default: the suite's
    budget plus fleet.timeout_s for the download)."""
    from .bundle import build_artifact, next_version, public_key_path
    from .ota.calibration import run_calibration_job
    from .ota.http_server import ArtifactServer, plan_http
    from .profile.calibrate import build_suite, fit_calibration, store_calibration
    from .profile.calibrate.build import DEFAULT_BUDGET_S

    t0 = time.perf_counter()
    local = target.name == HOST and not device_ids
    if not local:
        devices = choose_devices(fleet, fleet.store_at(workdir), target.name, device_ids, count)
        if external is None:
            raise ConfigError(f"calibrating {target.name} from its devices needs the broker they are connected to: "
                              "set fleet.broker in deploy.yaml (only host is calibrated through a local broker)")
    threads = host_threads(target) if target.name == HOST else target.cpu.cores
    budget_s = budget_s or DEFAULT_BUDGET_S
    version = next_version(workdir)
    out = workdir / "calibration" / f"{target.name}-v{version}"
    with ui.stage(f"Build the calibration suite for {target.name}"):
        built = build_suite(target, out, scale=scale, threads=threads, budget_s=budget_s, progress=ui.info)
    # a suite is tens of MB: with fleet.http it travels as a deploy's payload does, by Range requests
    serve_http, url_base = plan_http(fleet.http)
    with ui.stage("Sign it as a calibration artifact"):
        artifact = build_artifact(built.zip_path, workdir / "artifacts", name=f"{target.name}-calibration",
                                  version=version, target=target.name, runtime="onnxruntime", golden_inputs=None,
                                  budgets={}, predicted={}, health={}, key_dir=key_dir, kind="calibration",
                                  url_base=url_base)
        ui.info(f"{artifact.dir.name}: {artifact.size_bytes:,} bytes, "
                + (f"fetched from {artifact.manifest.url}" if artifact.manifest.url
                   else f"{artifact.manifest.chunks} chunk(s)"))
    timeout_s = timeout_s or budget_s + fleet.timeout_s
    with contextlib.ExitStack() as stack:
        if serve_http is not None:
            server = stack.enter_context(ArtifactServer(workdir / "artifacts", serve_http.host, serve_http.port))
            ui.info(f"serving the suite over HTTP at {server.base_url}")
        broker = external
        if broker is None:
            from .broker import LocalBroker

            lb = stack.enter_context(LocalBroker(fleet.local_broker, workdir / "calibration" / "broker"))
            broker = lb.config
            ui.info(f"local {lb.kind} broker on {broker.host}:{broker.port}")
        if local:
            from .ota.local_fleet import LocalFleet

            agents = stack.enter_context(LocalFleet(workdir / "calibration" / "devices", broker, target.name,
                                                    count or 1, public_key_path(key_dir), fleet.topic_prefix,
                                                    threads=threads))
            devices = agents.device_ids
            ui.info(f"{len(devices)} local agent process(es) on this machine: {', '.join(devices)}")
        with ui.stage(f"Time the suite on {len(devices)} device(s) (at most {timeout_s:.0f} s)"):
            run = run_calibration_job(broker, fleet.topic_prefix, artifact, devices,
                                      {c.id for c in built.suite.cases}, timeout_s, progress=_progress(ui))
    atomic_write_bytes(out / "results.json", json.dumps(
        {"run": run.to_dict(), "results": run.results(), "artifact": str(artifact.dir)}, default=str).encode())
    atomic_write_bytes(out / SUITE_FILE, built.suite.to_json())
    report: dict[str, Any] = {"target": target.name, "version": version, "suite": built.to_dict(),
                              "artifact": artifact.to_dict(), "devices": [d.to_dict() for d in run.devices],
                              "unfinished": run.unfinished, "results_file": str(out / "results.json")}
    for d in run.devices:
        if d.status.value in ("refused", "failed"):
            ui.warn(f"{d.device_id} {d.status.value} the calibration job: {d.reason}")
    if not run.results():
        raise DeliveryError(f"no device of {target.name} timed any case: " + "; ".join(
            f"{d.device_id} {d.status.value}" + (f" ({d.reason})" if d.reason else "") for d in run.devices))
    with ui.stage("Fit the predictor on what the devices measured"):
        fitted = fit_calibration(built, run.results(), target)
    provenance = _provenance(run, built, target, time.perf_counter() - t0)
    report["written"] = store_calibration(fitted, target, provenance)
    # what stays: the results and the suite beside them, and the signed payload in the artifact directory
    shutil.rmtree(built.dir, ignore_errors=True)
    built.zip_path.unlink(missing_ok=True)
    report.update(provenance=provenance, peaks=fitted["peaks"], kernel_fit=fitted["kernel_fit"],
                  op_fit=(fitted["ops"] or {}).get("fit"), wall_s=round(time.perf_counter() - t0, 1))
    k = fitted["kernel_fit"]
    _record(fleet.store_at(workdir), ui, target=target.name, version=version, date=provenance["date"], basis="suite",
            devices=provenance["devices"], samples={"suite": provenance["samples"], "fleet": {}},
            wall_s=report["wall_s"],
            fit={"on": "suite models", **{key: k.get(key) for key in ("kernels", "models", "median_abs_error_pct",
                                                                       "within_10pct", "max_abs_error_pct")}},
            kernels_file=report["written"].get("kernels"))
    return report


def _record(db: Path | str, ui: UI, **run: Any) -> None:
    """The run in the fleet store's calibrations (what ``pipeline fleet status`` shows). The calibration is
    written by then: a store that cannot take the record costs a warning, not the run."""
    from .fleet.accuracy import record_calibration

    try:
        store = FleetStore(db)
        try:
            record_calibration(store, **run)
        finally:
            store.close()
    except (*STORE_ERRORS, StoreError) as exc:
        ui.warn(f"the calibration is written but not recorded in the fleet store {redact(db)}: {exc}")


def _missing(target: str, workdir: Path, db: Path | str, stored, measured: dict[str, Any] | None) -> list[str]:
    """What ``--from-fleet`` lacks, each with the command that provides it."""
    problems = []
    if stored is None:
        problems.append(f"no stored calibration of {target} under {workdir / 'calibration'}: run `pipeline targets "
                        f"calibrate --target {target}` first")
    if measured is None or not measured["models"]:
        who = ("no emulated agent (local agents measure this host) has reported on a model deployed from here: run "
               "`pipeline deploy` first" if target == HOST else
               f"no device of class {target} has reported on a model deployed from here: run `pipeline deploy "
               f"--target {target}`, then `pipeline fleet ingest` while the devices report")
        problems.append(f"{who} (fleet store {redact(db)}{'' if exists(db) else ': none yet'})")
    return problems


def refit_from_fleet(target: TargetProfile, workdir: Path, ui: UI, store: Path | str | None = None) -> dict[str, Any]:
    """Refit ``target``'s predictor from its latest stored suite results and what its fleet measured of the models
    deployed to it (``pipeline targets calibrate --from-fleet``): offline, against ``workdir``'s files and the fleet
    store (``store``; default WORKDIR/fleet.db)."""
    from .fleet.accuracy import measured_models
    from .profile.calibrate import refit

    t0 = time.perf_counter()
    db = workdir / "fleet.db" if store is None else store
    stored = refit.latest_stored(workdir, target.name)
    measured = None
    if exists(db):
        store = FleetStore(db)
        try:
            measured = measured_models(store, target.name)
        finally:
            store.close()
    if problems := _missing(target.name, workdir, db, stored, measured):
        raise ConfigError(f"targets calibrate --from-fleet --target {target.name}: " + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="refit-") as tmp:
        with ui.stage(f"Read {target.name} v{stored.version}'s suite results and the fleet's models"):
            built = refit.suite_files(stored, Path(tmp) / "suite")
            models, skipped = refit.fleet_files(measured["models"], Path(tmp) / "fleet")
            for s in skipped:
                ui.warn(f"{s['target']} v{s['version']} left out: {s['reason']}")
            if not models:
                raise ConfigError(f"targets calibrate --from-fleet --target {target.name}: none of the "
                                  f"{len(skipped)} measured model version(s) can be read back: " +
                                  "; ".join(f"v{s['version']}: {s['reason']}" for s in skipped))
            ui.info(f"{len(models)} fleet model(s) measured by {len({d for m in models for d in m.devices})} "
                    f"device(s), beside the suite's results from {len(stored.results)} device(s)")
        with ui.stage(f"Refit {target.name}'s predictor on the suite and the fleet's models"):
            fitted = refit.refit(built, stored.results, models, target)
    prov = refit.provenance(stored, models, fitted, time.perf_counter() - t0)
    written = refit.store_refit(fitted, target, prov)
    report = {"target": target.name, "basis": "from_fleet", "version": stored.version, "rows": fitted["rows"],
              "weights": fitted["weights"], "share": fitted["share"], "fleet": fitted["fleet"],
              "suite_models": fitted["suite_models"], "models": fitted["models"], "skipped": skipped,
              "invalid_reports": measured["invalid"], "provenance": prov, "written": written,
              "wall_s": round(time.perf_counter() - t0, 1)}
    _record(db, ui, target=target.name, version=stored.version, date=prov["date"], basis="from_fleet",
            devices=sorted({*prov["devices"], *prov["fleet"]["devices"]}),
            samples={"suite": prov["samples"], "fleet": {f"{m.target} v{m.version}": m.samples for m in models}},
            wall_s=report["wall_s"], fit={"on": "fleet models", **fitted["fleet"]["refit"],
                                          "old": fitted["fleet"]["old"]},
            kernels_file=written["kernels"])
    return report
