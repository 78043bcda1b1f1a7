"""Calibrating a device class end to end: a real Mosquitto, real agent processes timing a real suite shipped as a
signed calibration artifact over the OTA path, the fit written with its provenance into the user targets
directory, and the profile then predicting from it and saying so."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import require, small_deploy_config

pytestmark = pytest.mark.slow


def test_host_is_calibrated_through_a_local_agent_over_http_and_the_profile_predicts_from_it(tmp_path):
    """The suite travels as fleet.http says (here: served by the host, fetched by Range requests); the MQTT
    chunks of a suite are the next test's."""
    from pipeline.broker import mosquitto_binary
    from pipeline.profile.kernels import KernelPredictor
    from pipeline.targets import load_target_file

    require(mosquitto_binary() is not None, "mosquitto")
    config = small_deploy_config(tmp_path, local_broker="mosquitto", http={"serve": True})
    targets = tmp_path / "targets"
    env = {**os.environ, "EDGEFLEET_TARGETS_DIR": str(targets)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "targets", "calibrate", "--target", "host",
                           "--scale", "tiny", "--config", str(config), "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    [device] = report["devices"]
    cases = report["suite"]["cases"]
    assert device["status"] == "finished" and device["cases"] == cases and report["unfinished"] == []
    assert device["device_id"] == "host-emu-0" and device["refused_messages"] == 0
    assert "serving the suite over HTTP" in proc.stderr and device["chunks_served"] == 0  # fetched, not chunked
    assert f"host-emu-0: finished {cases}/{cases} cases" in proc.stderr  # progress, device by device

    today = dt.date.today().isoformat()
    kernels = json.loads((targets / "host.kernels.json").read_text())
    cal = kernels["meta"]["calibration"]
    assert cal["devices"] == ["host-emu-0"] and cal["date"] == today and cal["samples"] == {"host-emu-0": cases}
    for key in ("agent_versions", "runtime_versions", "cpu", "machine"):
        assert cal[key]["host-emu-0"], key
    assert cal["threads"] >= 1 and cal["suite"]["cases"] == cases and cal["wall_s"] > 0
    assert cal["fit"]["models"] == 8 and cal["fit"]["median_abs_error_pct"] is not None
    assert report["written"] == {"kernels": str(targets / "host.kernels.json"), "target": str(targets / "host.yaml")}
    host = load_target_file(targets / "host.yaml")
    assert host.efficiency.ops and host.cpu.peak_gflops_fp32 == report["peaks"]["gflops_fp32"]

    with zipfile.ZipFile(report["artifact"]["path"] + "/host-calibration.zip") as z:  # the signed payload
        model = tmp_path / "m0.onnx"
        model.write_bytes(z.read("m0.onnx"))
    kept = sorted(p.name for p in Path(report["results_file"]).parent.iterdir())
    assert kept == ["results.json", "suite.json"]  # the case files are gone; the payload stays in the artifact
    prof = subprocess.run([sys.executable, "-m", "pipeline.cli", "profile", str(model), "--target", "host", "--runs",
                           "10", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert prof.returncode in (0, 3), prof.stderr[-2000:]
    predicted = json.loads(prof.stdout)["predicted"]
    assert predicted["basis"].startswith(f"calibrated from 1 device on {today}"), predicted["basis"]
    assert f"calibrated from 1 device on {today}" in prof.stderr  # the profile table says it too
    expected = KernelPredictor.load(targets / "host.kernels.json").predict_ms(model)
    assert predicted["latency_ms"] == pytest.approx(expected, abs=1e-4)


def _suite_artifact(tmp_path, key_dir):
    from pipeline.bundle import build_artifact
    from pipeline.profile.calibrate import SCALES, build_suite
    from pipeline.targets import load_target

    built = build_suite(load_target("host"), tmp_path / "suite", scale=SCALES["tiny"], threads=1,
                        progress=lambda _: None)
    artifact = build_artifact(built.zip_path, tmp_path / "art", name="host-calibration", version=11, target="host",
                              runtime="onnxruntime", golden_inputs=None, budgets={}, predicted={}, health={},
                              key_dir=key_dir, kind="calibration")
    return built, artifact


def test_a_device_that_never_answers_is_named_with_what_it_did_when_the_job_times_out(mosquitto, key_dir, tmp_path):
    from pipeline.ota.calibration import CalibrationStatus, run_calibration_job

    built, artifact = _suite_artifact(tmp_path, key_dir)
    run = run_calibration_job(mosquitto.config, "edgefleet", artifact, ["ghost"], {c.id for c in built.suite.cases},
                              2)
    [ghost] = run.devices
    assert ghost.status is CalibrationStatus.TIMEOUT and run.unfinished == ["ghost"] and run.results() == {}
    assert f"not finished within 2 s (0 of {len(built.suite.cases)} cases; last state: none)" == ghost.reason


def test_two_devices_combine_by_median_and_one_resumes_after_a_crash(mosquitto, key_dir, tmp_path):
    from pipeline.bundle import public_key_path
    from pipeline.ota.calibration import CalibrationStatus, run_calibration_job
    from pipeline.ota.local_fleet import LocalFleet
    from pipeline.profile.calibrate import combine
    from pipeline.profile.calibrate.fit import normalise

    built, artifact = _suite_artifact(tmp_path, key_dir)
    ids = {c.id for c in built.suite.cases}
    timing = threading.Event()
    at_kill: list[CalibrationStatus] = []

    def progress(d) -> None:  # emu-1 says it is timing the suite: it is killed then, mid-suite
        if d.device_id == "host-emu-1" and d.states[-1:] == ["calibrating"] and not timing.is_set():
            at_kill.append(d.status)
            timing.set()

    with LocalFleet(tmp_path / "devices", mosquitto.config, "host", 2, public_key_path(key_dir), "edgefleet",
                    threads=1) as fleet:
        out: dict = {}
        runner = threading.Thread(target=lambda: out.update(run=run_calibration_job(
            mosquitto.config, "edgefleet", artifact, fleet.device_ids, ids, 120, progress=progress)))
        runner.start()
        assert timing.wait(60), fleet.log_tail("host-emu-1")
        fleet.procs["host-emu-1"].kill()  # mid-suite: it resumes where it was after the restart
        fleet.procs["host-emu-1"].wait(10)
        fleet.spawn("host-emu-1")
        runner.join(150)
    run = out["run"]
    by_id = {d.device_id: d for d in run.devices}
    for d in ("host-emu-0", "host-emu-1"):
        assert by_id[d].status is CalibrationStatus.FINISHED and set(by_id[d].results) == ids, by_id[d].to_dict()
    assert run.unfinished == []  # the job ends as its last device finishes, not at its timeout
    assert at_kill and at_kill[0] not in (CalibrationStatus.FINISHED, CalibrationStatus.STOPPED)  # killed mid-suite
    results = run.results()
    assert set(results) == {"host-emu-0", "host-emu-1"}
    measured = combine(built.suite, results)
    a, b = (normalise(built.suite, results[d])[0] for d in ("host-emu-0", "host-emu-1"))
    for case_id in ids:
        assert measured.ms[case_id] == pytest.approx((a[case_id] + b[case_id]) / 2)  # the median of two
    assert measured.kernel_us and measured.counts == {"host-emu-0": len(ids), "host-emu-1": len(ids)}
