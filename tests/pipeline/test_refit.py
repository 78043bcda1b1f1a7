"""The refit of ``pipeline targets calibrate --from-fleet`` (pipeline.profile.calibrate.refit): a real tiny suite
(its ONNX files, its signed calibration artifact, its results as a run stores them), a device whose timings are
known (each case at its roofline estimate), and fleet models measured at a known factor off the class's predictor.
Nothing is timed: the numbers the refit promises, not its speed."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from calibration_suites import conv, gemm
from pipeline.errors import ConfigError
from pipeline.profile.calibrate import SCALES, build_suite, fit_predictor, write_kernels
from pipeline.profile.calibrate.build import estimate_ms
from pipeline.profile.calibrate.fit import combine, fit_correction
from pipeline.profile.calibrate.refit import (FLEET_SHARE, FleetModel, fleet_errors, fleet_files, fleet_weights,
                                              latest_stored, provenance, refit, store_refit, suite_files)
from pipeline.profile.kernels import KernelPredictor
from pipeline.targets import load_target

VERSION = 1700
DEVICE = "pi-lab"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny rpi4 suite, stored as a run leaves it (results.json, suite.json, the signed artifact), timed by a
    device that runs each case at its roofline estimate: (workdir, per-device results)."""
    from pipeline.bundle import build_artifact, load_or_create

    tmp = tmp_path_factory.mktemp("refit")
    workdir = tmp / "work"
    rpi4 = load_target("rpi4")
    built = build_suite(rpi4, tmp / "suite", scale=SCALES["tiny"], threads=4, progress=lambda _: None)
    by_file = {c.file: estimate_ms(built.dir / c.file, rpi4) for c in built.suite.cases}
    results = {DEVICE: {c.id: {"id": c.id, "median_ms": by_file[c.file], "p10_ms": 0.9 * by_file[c.file],
                               "p90_ms": 1.1 * by_file[c.file], "runs": 20, "rounds": 5} for c in built.suite.cases}}
    load_or_create(tmp / "keys")
    artifact = build_artifact(built.zip_path, workdir / "artifacts", name="rpi4-calibration", version=VERSION,
                              target="rpi4", runtime="onnxruntime", golden_inputs=None, budgets={}, predicted={},
                              health={}, key_dir=tmp / "keys", kind="calibration")
    out = workdir / "calibration" / f"rpi4-v{VERSION}"
    out.mkdir(parents=True)
    run = {"job_id": "c1", "devices": [{"device_id": DEVICE, "env": {"agent_version": "0.1.0", "cpu": "Cortex-A72",
                                                                     "runtime_version": "1.20"}}]}
    (out / "results.json").write_text(json.dumps({"run": run, "results": results, "artifact": str(artifact.dir)}))
    (out / "suite.json").write_bytes(built.suite.to_json())
    return workdir, results, built


@pytest.fixture
def targets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_TARGETS_DIR", str(tmp_path / "targets"))
    return tmp_path / "targets"


@pytest.fixture
def fleet_models(tmp_path):
    """Four small models of the kinds real ones have: a first layer, a body convolution, a depthwise one, a head."""
    d = tmp_path / "fleet"
    d.mkdir()
    return [conv(d / "first.onnx", 3, 16, 28)[0], conv(d / "body.onnx", 16, 32, 14, seed=1)[0],
            conv(d / "dw.onnx", 32, 32, 14, groups=32, seed=2)[0], gemm(d / "head.onnx", 512, 64, seed=3)[0]]


def old_predictor(calibrated, targets_dir) -> KernelPredictor:
    """The suite's own fit, written where rpi4's predictor is looked up: what the class is predicted with now."""
    _, results, built = calibrated
    predictor, _ = fit_predictor(built, combine(built.suite, results))
    write_kernels(predictor, "rpi4", {"calibration": {"devices": [DEVICE]}}, targets_dir)
    return predictor


def measured_at(paths, predictor: KernelPredictor, factor: float) -> list[FleetModel]:
    out = []
    for i, p in enumerate(paths):
        ms = factor * predictor.predict_ms(p)
        out.append(FleetModel("rpi4", 10 + i, p, ms, {"pi-a": 0.98 * ms, "pi-b": 1.02 * ms}, 6))
    return out


def stored_suite(calibrated, tmp_path):
    workdir = calibrated[0]
    stored = latest_stored(workdir, "rpi4")
    return stored, suite_files(stored, tmp_path / "files")


def test_the_refit_takes_the_fleet_s_word_where_the_old_predictor_is_off_by_a_known_factor(
        calibrated, targets_dir, fleet_models, tmp_path):
    old = old_predictor(calibrated, targets_dir)
    fleet = measured_at(fleet_models, old, 1.5)  # the fleet runs them 1.5x slower than the class's predictor says
    stored, built = stored_suite(calibrated, tmp_path)
    fitted = refit(built, stored.results, fleet, load_target("rpi4"))

    before, after = fitted["fleet"]["old"], fitted["fleet"]["refit"]
    assert before["models"] == after["models"] == 4
    assert before["median_error"] == pytest.approx(0.5, abs=1e-3)  # exactly the known factor
    assert before["within_20pct"] == 0.0
    assert abs(after["median_error"]) < 0.2 and after["median_abs_error_pct"] < 20, after
    assert after["within_20pct"] >= 0.75
    assert fitted["rows"] == {"suite_kernels": len(combine(built.suite, stored.results).kernel_us),
                              "suite_models": 8, "fleet_models": 4}
    for m, f in zip(fitted["models"], fleet):  # each model's figures, as the report lists them
        assert (m["version"], m["devices"], m["samples"]) == (f.version, ["pi-a", "pi-b"], 6)
        assert m["old_ms"] == pytest.approx(f.measured_ms / 1.5, rel=1e-3)
        assert fitted["predictor"].predict_ms(f.path) == pytest.approx(m["refit_ms"], rel=1e-5)
    # the suite's own models were timed in the lab: pulled towards the fleet's figure, they now read slower
    assert fitted["suite_models"]["old"]["median_abs_error_pct"] < 10
    assert -0.5 < fitted["suite_models"]["refit"]["median_error"] < 0

    # the more the fleet weighs, the closer its models come (at 0 and 0.5 each counts as one of the 4 fp32 suite
    # models: the per-kind terms still move some of the way)
    errors = [abs(refit(built, stored.results, fleet, load_target("rpi4"), share)["fleet"]["refit"]["median_error"])
              for share in (0.0, 0.5, FLEET_SHARE, 0.95)]
    assert errors[0] >= errors[1] > errors[2] > errors[3] and errors[2] == abs(after["median_error"]), errors
    assert errors[0] < 0.5 and errors[3] < 0.1, errors


def test_a_fleet_that_agrees_with_the_suite_leaves_the_predictor_where_it_was(
        calibrated, targets_dir, fleet_models, tmp_path):
    old = old_predictor(calibrated, targets_dir)
    stored, built = stored_suite(calibrated, tmp_path)
    fitted = refit(built, stored.results, measured_at(fleet_models, old, 1.0), load_target("rpi4"))
    assert fitted["fleet"]["refit"]["median_abs_error_pct"] < 2
    suite = fitted["suite_models"]
    assert suite["refit"]["median_abs_error_pct"] == pytest.approx(suite["old"]["median_abs_error_pct"], abs=0.5)
    assert fitted["predictor"].correction["fp32"] == pytest.approx(old.correction["fp32"], rel=0.05, abs=1e-3)


def test_the_refit_file_says_from_fleet_with_the_versions_and_devices_and_predicts_as_the_fit_did(
        calibrated, targets_dir, fleet_models, tmp_path):
    old = old_predictor(calibrated, targets_dir)
    fleet = measured_at(fleet_models[:2], old, 2.0)
    stored, built = stored_suite(calibrated, tmp_path)
    fitted = refit(built, stored.results, fleet, load_target("rpi4"))
    written = store_refit(fitted, load_target("rpi4"), provenance(stored, fleet, fitted, 1.25))
    assert written == {"kernels": str(targets_dir / "rpi4.kernels.json")}

    loaded = KernelPredictor.load(targets_dir / "rpi4.kernels.json")
    cal = loaded.meta["calibration"]
    assert cal["basis"] == "from_fleet" and cal["devices"] == [DEVICE] and cal["samples"] == {DEVICE: len(built.suite.cases)}
    assert cal["suite"]["version"] == VERSION and cal["agent_versions"] == {DEVICE: "0.1.0"}
    assert cal["fleet"]["models"] == [{"target": "rpi4", "version": v, "devices": ["pi-a", "pi-b"], "samples": 6,
                                       "measured_ms": pytest.approx(f.measured_ms, rel=1e-5)}
                                      for v, f in zip((10, 11), fleet)]
    assert cal["fleet"]["devices"] == ["pi-a", "pi-b"] and cal["fleet"]["share"] == FLEET_SHARE
    assert cal["fit"]["fleet"] == fitted["fleet"] and cal["wall_s"] == 1.2
    for f in fleet:  # no pickled state: the forests fitted again from the file predict what the fit did
        assert loaded.predict_ms(f.path) == pytest.approx(fitted["predictor"].predict_ms(f.path), rel=1e-9)


def test_weights_give_the_fleet_its_share_whatever_the_counts():
    assert fleet_weights(32, 4, 0.8) == (1.0, pytest.approx(32.0))  # 4 x 32 = 128 of 160: 80%
    assert fleet_weights(32, 1, 0.5) == (1.0, pytest.approx(32.0))
    assert fleet_weights(4, 40, 0.5) == (1.0, 1.0)  # never below one suite model's
    assert fleet_weights(0, 3) == fleet_weights(8, 0) == (1.0, 1.0)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="share"):
            fleet_weights(8, 2, bad)


def test_weighted_rows_pull_the_correction_towards_them():
    """Three models timed at twice what one coefficient says, next to thirty that agree with it: the fit lands
    where their weights put it, the optimum of the weighted squared relative errors."""
    rng = np.random.default_rng(0)
    rows = np.column_stack([np.zeros(33), rng.uniform(10, 100, 33)])
    times = rows[:, 1].copy()
    times[30:] *= 2
    [_, c_equal] = fit_correction(rows, times)
    ws, wf = fleet_weights(30, 3, 0.9)
    [_, c_fleet] = fit_correction(rows, times, np.array([ws] * 30 + [wf] * 3))
    # minimising sum w (c x / t - 1)^2 over c: c = sum(w / t') / sum(w / t'^2) with t' = t / x (1 or 2)
    expect = lambda w_s, w_f: (30 * w_s + 3 * w_f / 2) / (30 * w_s + 3 * w_f / 4)  # noqa: E731
    assert c_equal == pytest.approx(expect(1, 1), rel=1e-6)
    assert c_equal < 1.1 and c_fleet == pytest.approx(expect(ws, wf), rel=1e-6) and c_fleet > 1.65


def test_errors_are_the_fleet_s_definition():
    e = fleet_errors([10.0, 10.0, 10.0, 10.0], [11.0, 8.0, 12.5, 10.0])
    assert e["median_error"] == pytest.approx(statistics.median([0.1, -0.2, 0.25, 0.0]))
    assert e["median_abs_error_pct"] == pytest.approx(15.0)
    assert (e["within_10pct"], e["within_20pct"], e["models"], e["unpredicted"]) == (0.5, 0.75, 4, 0)
    assert fleet_errors([], [])["median_error"] is None
    nothing = fleet_errors([0.0, 10.0], [5.0, 11.0])  # a predictor that priced none of a model's kernels
    assert (nothing["models"], nothing["unpredicted"], nothing["median_error"]) == (1, 1, pytest.approx(0.1))


def test_the_latest_stored_suite_is_taken_and_a_broken_one_is_named(calibrated, tmp_path):
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(calibrated[0], workdir)
    assert latest_stored(tmp_path / "nowhere", "rpi4") is None
    src = workdir / "calibration" / f"rpi4-v{VERSION}"
    shutil.copytree(src, workdir / "calibration" / "rpi4-v99")  # an older run
    (workdir / "calibration" / "rpi4-v5000").mkdir()  # a run that never stored its results: not a calibration
    stored = latest_stored(workdir, "rpi4")
    assert stored.version == VERSION and stored.results.keys() == {DEVICE} and stored.run["job_id"] == "c1"
    data = json.loads((src / "results.json").read_text())
    del data["artifact"]  # stored before the artifact was named: found by its name under artifacts/
    (src / "results.json").write_text(json.dumps(data))
    assert latest_stored(workdir, "rpi4").artifact == workdir / "artifacts" / f"rpi4-calibration-rpi4-v{VERSION}"
    shutil.rmtree(workdir / "artifacts")
    with pytest.raises(ConfigError, match=f"calibration artifact of rpi4 v{VERSION} is gone"):
        suite_files(latest_stored(workdir, "rpi4"), tmp_path / "files")
    (src / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"rpi4-v{VERSION}: the stored calibration cannot be read"):
        latest_stored(workdir, "rpi4")


def test_fleet_models_that_cannot_be_read_back_are_left_out_with_the_reason(calibrated, tiny_onnx, tmp_path):
    from conftest import make_artifact
    from pipeline.bundle import load_or_create

    load_or_create(tmp_path / "keys")
    good = make_artifact(tiny_onnx, tmp_path / "artifacts", tmp_path / "keys", 7)
    changed = make_artifact(tiny_onnx, tmp_path / "artifacts", tmp_path / "keys", 8)
    changed.model_path.write_bytes(changed.model_path.read_bytes() + b"\0")
    suite_zip = calibrated[0] / "artifacts" / f"rpi4-calibration-rpi4-v{VERSION}"
    row = {"target": "rpi4", "devices": {"pi": 1.0}, "measured_ms": 1.0, "samples": 3}
    models, skipped = fleet_files([{**row, "version": 7, "artifact": str(good.dir)},
                                   {**row, "version": 8, "artifact": str(changed.dir)},
                                   {**row, "version": 9, "artifact": None},
                                   {**row, "version": 10, "artifact": str(tmp_path / "gone")},
                                   {**row, "version": 11, "artifact": str(suite_zip)}], tmp_path / "out")
    assert [(m.version, m.path.read_bytes()) for m in models] == [(7, tiny_onnx.read_bytes())]
    reasons = {s["version"]: s["reason"] for s in skipped}
    assert "sha256 is not the manifest's" in reasons[8]
    assert reasons[9].startswith("never deployed from this host")
    assert reasons[10].startswith("its artifact is gone")
    assert reasons[11] == "not an ONNX model (rpi4-calibration.zip)"
