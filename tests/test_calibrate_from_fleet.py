"""`pipeline targets calibrate --from-fleet` and the calibrations the fleet store keeps: the store's new table on a
store of the previous schema, the fleet's measured models as the ingester stores them, the CLI's errors for what
is missing, and end to end a real host calibration through a local agent and a real delivery to local agents on a
real Mosquitto, refit from what those agents measured and shown by `pipeline fleet status`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from conftest import require, small_deploy_config

T0 = 1_700_000_000.0


def record(store, **kw) -> int:
    from pipeline.fleet.accuracy import record_calibration

    base = {"target": "host", "version": 1, "date": "2026-01-02", "basis": "suite", "devices": ["host-emu-0"],
            "samples": {"suite": {"host-emu-0": 62}, "fleet": {}}, "wall_s": 20.0,
            "fit": {"on": "suite models", "models": 8, "median_abs_error_pct": 4.0}, "kernels_file": "/k.json"}
    return record_calibration(store, **{**base, **kw})


def test_a_store_of_the_previous_schema_migrates_keeps_its_rows_and_records_calibrations(tmp_path):
    from pipeline.fleet import FleetStore
    from pipeline.fleet.accuracy import latest_calibrations
    from pipeline.fleet.store import MIGRATIONS

    db = tmp_path / "fleet.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE schema_version (v INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) - 1,))
    for sql in MIGRATIONS[:-1]:
        con.execute(sql)
    con.execute("INSERT INTO deployments (ts, name, target, version, sha256, artifact, kind, status) "
                "VALUES (1.0, 'm', 'rpi4', 3, '', 'a', 'deploy', 'succeeded')")
    con.execute("INSERT INTO metrics (device_id, ts, version, latency_ms_p50, emulated) VALUES ('pi', 2.0, 3, 9.0, 0)")
    con.commit()
    con.close()

    store = FleetStore(db)
    try:
        assert store.db.execute("SELECT v FROM schema_version").fetchone()[0] == len(MIGRATIONS)
        assert [d["version"] for d in store.history()] == [3] and store.count("metrics") == 1
        assert latest_calibrations(store) == []
        record(store, version=1)
        record(store, version=2, basis="from_fleet", devices=["host-emu-0", "rpi4-emu-0"],
            samples={"suite": {"host-emu-0": 62}, "fleet": {"rpi4 v100": 2}},
            fit={"on": "fleet models", "models": 1, "median_abs_error_pct": 3.5, "within_10pct": 1.0})
        record(store, target="rpi4", version=7, devices=["pi-a", "pi-b"], kernels_file=None, fit=None)
        store.db.execute("INSERT INTO calibrations (ts, target, version, basis, devices, samples) "
                         "VALUES (1.0, 'rpi5', 1, 'suite', '[not json', '{}')")  # written around this code
    finally:
        store.close()

    store = FleetStore(db)  # reopened: the table and its rows are there
    try:
        by = {c["target"]: c for c in latest_calibrations(store)}
    finally:
        store.close()
    assert list(by) == ["host", "rpi4", "rpi5"]
    host = by["host"]
    assert (host["version"], host["basis"], host["date"], host["kernels_file"]) == (2, "from_fleet", "2026-01-02",
                                                                                   "/k.json")
    assert host["devices"] == ["host-emu-0", "rpi4-emu-0"] and host["samples"]["fleet"] == {"rpi4 v100": 2}
    assert host["fit"]["median_abs_error_pct"] == 3.5 and host["wall_s"] == 20.0
    assert by["rpi4"]["fit"] is None and by["rpi4"]["kernels_file"] is None
    assert by["rpi5"]["devices"] is None and by["rpi5"]["samples"] == {}  # unreadable JSON is unknown, not a crash


def test_the_fleet_s_measured_models_are_per_class_and_version_real_devices_for_theirs_emulated_for_host(tmp_path):
    from pipeline.fleet import FleetStore
    from pipeline.fleet.accuracy import measured_models

    store = FleetStore(tmp_path / "fleet.db")
    try:
        for version in (3, 4):
            store.record(name="m", target="rpi4", version=version, sha256="0" * 64, artifact=f"/art/v{version}",
                         kind="deploy", status="succeeded", reason=None, results=[])
        store.record(name="m", target="rpi4", version=4, sha256="0" * 64, artifact="/art/v4-again", kind="deploy",
                     status="succeeded", reason=None, results=[])
        messages = [(d, "status", {"target": "rpi4", "state": "activated", "ts": T0}) for d in
                    ("pi-a", "pi-b", "rpi4-emu-0")]
        messages += [(d, "status", {"target": "rpi5", "state": "activated", "ts": T0}) for d in ("pi5",)]
        for i, (device, version, p50, emulated) in enumerate([
                ("pi-a", 3, 10.0, False), ("pi-a", 3, 12.0, False), ("pi-a", 3, 30.0, False),  # its median: 12
                ("pi-b", 3, 8.0, False), ("pi-b", 4, 9.0, False), ("pi-b", 4, float("nan"), False),
                ("rpi4-emu-0", 3, 2.0, True), ("pi5", 3, 5.0, False), ("pi-a", 5, 11.0, False)]):
            messages.append((device, "metrics", {"version": version, "latency_ms_p50": p50, "emulated": emulated,
                                                 "ts": T0 + i}))
        store.ingest(messages)  # the ingester's own path: the NaN arrives as unknown
        rpi4, host = measured_models(store, "rpi4"), measured_models(store, "host")
    finally:
        store.close()
    assert [(m["target"], m["version"], m["devices"], m["measured_ms"], m["samples"], m["artifact"])
            for m in rpi4["models"]] == [
        ("rpi4", 3, {"pi-a": 12.0, "pi-b": 8.0}, 10.0, 4, "/art/v3"),
        ("rpi4", 4, {"pi-b": 9.0}, 9.0, 1, "/art/v4-again"),  # the latest deployment of that version
        ("rpi4", 5, {"pi-a": 11.0}, 11.0, 1, None)]  # never deployed from here
    assert rpi4["invalid"] == 1
    # emulated agents measured this host: they are host's fleet, never rpi4's
    assert [(m["target"], m["version"], m["devices"]) for m in host["models"]] == [("rpi4", 3, {"rpi4-emu-0": 2.0})]


def cli(cwd, *args: str) -> tuple[int, str]:
    """The command as a user runs it (in its own process: this directory of tests has its own ``pipeline``)."""
    env = {**os.environ, "EDGEFLEET_TARGETS_DIR": str(cwd / "targets")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "targets", "calibrate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, " ".join((proc.stderr + proc.stdout).split())  # rich wraps long lines


def test_from_fleet_names_what_is_missing_and_the_command_that_makes_it(tmp_path):
    from pipeline.fleet import FleetStore

    rc, out = cli(tmp_path, "--target", "host", "--from-fleet")
    assert rc == 2 and out.count("error:") == 1 and "Traceback" not in out, out
    assert "no stored calibration of host under" in out
    assert "run `pipeline targets calibrate --target host` first" in out
    assert "no emulated agent" in out and "run `pipeline deploy` first" in out
    assert f"fleet store {tmp_path / '.edgefleet' / 'fleet.db'}: none yet" in out
    assert not (tmp_path / ".edgefleet" / "fleet.db").exists()  # nothing created by asking

    (tmp_path / ".edgefleet").mkdir()
    FleetStore(tmp_path / ".edgefleet" / "fleet.db").close()  # a store with no measurements
    rc, out = cli(tmp_path, "--target", "rpi4", "--from-fleet")
    assert rc == 2 and "no stored calibration of rpi4" in out, out
    assert "no device of class rpi4 has reported" in out and "pipeline deploy --target rpi4" in out
    assert "pipeline fleet ingest" in out

    for extra, named in ((["--devices", "2"], "--devices does not apply"), (["--device", "pi"], "--device does"),
                         (["--scale", "tiny", "--budget", "60"], "--scale, --budget do not apply")):
        rc, out = cli(tmp_path, "--target", "rpi4", "--from-fleet", *extra)
        assert rc == 2 and named in out and "ships no suite" in out, out


@pytest.mark.slow
def test_host_refit_from_what_local_agents_measured_and_fleet_status_shows_it(tiny_onnx, tmp_path, monkeypatch):
    """A real tiny calibration of host through a local agent, then a real delivery to two local agents emulating
    rpi4 (they measure this host), then the refit: its rows, the old and refit errors on the delivered model, the
    file it wrote with from_fleet provenance, and both runs in the fleet store, the latest in fleet status."""
    from pipeline.broker import external_broker, mosquitto_binary
    from pipeline.bundle import build_artifact, load_or_create
    from pipeline.config import load_deploy
    from pipeline.fleet import FleetStore
    from pipeline.ota import stage
    from pipeline.profile.kernels import KernelPredictor
    from pipeline.targets import target_for_deploy
    from pipeline.ui import UI

    require(mosquitto_binary() is not None, "mosquitto")
    config = small_deploy_config(tmp_path, local_agents=2, local_broker="mosquitto")
    targets = tmp_path / "targets"
    env = {**os.environ, "EDGEFLEET_TARGETS_DIR": str(targets)}

    def pipeline(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--config", str(config), "--json"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    suite = pipeline("targets", "calibrate", "--target", "host", "--scale", "tiny")
    cfg = load_deploy(config)
    workdir = cfg.resolve(cfg.workdir)
    load_or_create(tmp_path / "keys")
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    art = build_artifact(tiny_onnx, workdir / "artifacts", name="tiny", version=100, target="rpi4",
                         runtime="onnxruntime", golden_inputs=x, budgets={}, predicted={"latency_ms": 5.0},
                         health={"runs": 5}, key_dir=tmp_path / "keys")
    monkeypatch.setenv("EDGEFLEET_TARGETS_DIR", str(targets))  # this process predicts for host as the CLI does
    delivery, _ = stage.deliver_stage(cfg.fleet, external_broker(cfg), target_for_deploy(cfg, "rpi4"), art, workdir,
                                      UI(quiet=True), force=True)
    assert [d["status"] for d in delivery] == ["activated", "activated"], delivery
    measured = [d["metrics"]["latency_ms_p50"] for d in delivery]

    report = pipeline("targets", "calibrate", "--target", "host", "--from-fleet")
    assert report["basis"] == "from_fleet" and report["version"] == suite["version"]
    assert report["rows"] == {"suite_kernels": suite["kernel_fit"]["kernels"], "suite_models": 8, "fleet_models": 1}
    [model] = report["models"]
    assert (model["target"], model["version"], model["devices"]) == ("rpi4", 100, ["rpi4-emu-0", "rpi4-emu-1"])
    assert model["measured_ms"] == pytest.approx(float(np.median(measured)), rel=1e-3)
    old, new = report["fleet"]["old"], report["fleet"]["refit"]
    # a tiny suite's predictor may price none of this MLP's kernels (0 ms): then it has no error, and says so
    assert old["models"] + old["unpredicted"] == 1 and new["models"] == 1 and model["refit_ms"] > 0
    if old["models"]:
        assert old["median_error"] == pytest.approx((model["measured_ms"] - model["old_ms"]) / model["old_ms"],
                                                    abs=1e-3)
        assert abs(new["median_error"]) <= abs(old["median_error"]) + 0.02, report["fleet"]
    assert new["median_error"] == pytest.approx((model["measured_ms"] - model["refit_ms"]) / model["refit_ms"],
                                                abs=1e-3)
    assert abs(new["median_error"]) < 0.2, report  # one fleet model next to 4 fp32 suite models: it is met

    kernels = targets / "host.kernels.json"
    assert report["written"] == {"kernels": str(kernels)}
    cal = json.loads(kernels.read_text())["meta"]["calibration"]
    assert cal["basis"] == "from_fleet" and cal["devices"] == ["host-emu-0"]
    assert cal["fleet"]["models"][0]["version"] == 100 and cal["fleet"]["devices"] == ["rpi4-emu-0", "rpi4-emu-1"]
    assert KernelPredictor.load(kernels).predict_ms(tiny_onnx) == pytest.approx(model["refit_ms"], rel=1e-5)

    store = FleetStore(workdir / "fleet.db")
    try:
        runs = store.db.execute("SELECT target, version, basis FROM calibrations ORDER BY id").fetchall()
    finally:
        store.close()
    assert [tuple(r) for r in runs] == [("host", suite["version"], "suite"), ("host", suite["version"], "from_fleet")]
    status = pipeline("fleet", "status")
    [latest] = status["calibrations"]
    assert (latest["target"], latest["basis"], latest["kernels_file"]) == ("host", "from_fleet", str(kernels))
    assert latest["samples"] == {"suite": {"host-emu-0": suite["suite"]["cases"]}, "fleet": {"rpi4 v100": 2}}
    assert latest["fit"]["median_abs_error_pct"] == new["median_abs_error_pct"]
    text = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True).stderr
    assert "Calibrations (latest per class)" in text and "from_fleet" in text
