"""The host's side of calibrating a device class (pipeline.profile.calibrate): the suite it ships (built, zipped,
read back by the agent's own parser), and the fits and files made from what devices measured, here figures made
up from a known cost model so the fit's answers can be checked."""

from __future__ import annotations

import datetime as dt
import json
import zipfile

import numpy as np
import pytest

from device_agent.calibration import SUITE_FILE, Suite
from pipeline.errors import ConfigError
from pipeline.profile.calibrate import (
    SCALES, build_suite, combine, fit_calibration, kernel_configs, parse_scale, store_calibration,
)
from pipeline.profile.calibrate.build import GROUP_SIZE
from pipeline.profile.kernels import Kernel, KernelPredictor, kernels_of
from pipeline.targets import load_target


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_suite(load_target("host"), tmp_path_factory.mktemp("suite"), scale=SCALES["tiny"], threads=2,
                       progress=lambda _: None)


def test_the_suite_reads_back_as_the_agent_reads_it(built):
    with zipfile.ZipFile(built.zip_path) as z:
        suite = Suite.from_json(z.read(SUITE_FILE))
        names = set(z.namelist())
    assert suite == built.suite and suite.to_dict() == Suite.from_dict(suite.to_dict()).to_dict()
    assert names == {SUITE_FILE} | {c.file for c in suite.cases}
    assert suite.threads == 2 and suite.name == "host-calibration" and suite.budget_s == 900
    meta = suite.extra["cases"]
    assert set(meta) == {c.id for c in suite.cases}
    for c in suite.cases:
        assert c.shape[0] == 1 and list(c.shape) == meta[c.id]["shape"]


def test_every_case_runs_with_its_declared_input(built):
    import onnxruntime as ort

    for c in built.suite.cases:
        s = ort.InferenceSession(str(built.dir / c.file), providers=["CPUExecutionProvider"])
        s.run(None, {s.get_inputs()[0].name: np.zeros(c.shape, np.float32)})


def test_a_kernel_and_its_prefix_are_timed_in_one_group_with_a_probe(built):
    suite, meta = built.suite, built.suite.extra["cases"]
    group = {c.id: c.group for c in suite.cases}
    for g in suite.groups():
        assert [c.id for c in g if meta[c.id]["role"] == "probe"] == [f"probe{g[0].group}"]
        assert len(g) <= GROUP_SIZE + 1
    kernels = [cid for cid, m in meta.items() if m["role"] == "kernel"]
    assert kernels and all(group[meta[k]["pair"]] == group[k] and meta[meta[k]["pair"]]["role"] == "prefix"
                           for k in kernels)
    assert {m["kernel"]["int8"] for m in meta.values() if m["role"] == "kernel"} == {False, True}
    models = [m for m in meta.values() if m["role"] == "model"]
    assert {m["precision"] for m in models} == {"fp32", "int8"} and len(models) == 8
    assert {cid for cid, m in meta.items() if m["role"] == "peak"} == {"peak-fp32", "peak-int8", "bandwidth"}
    # the kernel a case is said to hold is the one its graph holds, beside the prefix
    k = next(k for k in kernels if meta[k]["kernel"]["kind"] == "conv")
    assert Kernel(**meta[k]["kernel"]) in kernels_of(built.file(k))


def test_the_full_suite_spans_what_real_and_pruned_models_use():
    ks = kernel_configs(0, 1.0)
    assert {k.kind for k in ks} == {"conv", "dwconv", "gemm", "pool", "gpool", "add", "eltwise"}
    assert any(k.kind == "conv" and k.cin <= 3 and k.h >= 224 for k in ks)  # first layers of 224-pixel models
    assert any(k.kind == "conv" and k.cin <= 3 for k in ks)  # first layers with few channels
    assert sum(k.kind == "conv" and k.k == 1 for k in ks) >= 40  # pointwise
    assert any(k.kind == "dwconv" and k.k == 5 for k in ks) and any(k.kind == "dwconv" and k.h >= 112 for k in ks)
    assert sum((k.cin % 8 or k.cout % 8) and k.kind in ("conv", "dwconv") for k in ks) >= 50  # odd pruned widths
    assert len(kernel_configs(0, SCALES["tiny"])) < 30  # every family, one or so of each


def test_a_suite_is_sized_to_its_budget(tmp_path):
    small = build_suite(load_target("rpi4"), tmp_path, scale=SCALES["tiny"], threads=4, budget_s=5,
                        progress=lambda _: None)
    assert small.suite.runs < 20 and small.suite.runs >= 3 and small.suite.budget_s == 5


@pytest.mark.parametrize(("given", "scale"), [("tiny", SCALES["tiny"]), ("full", 1.0), ("0.5", 0.5), (2, 2.0)])
def test_scales_by_name_or_number(given, scale):
    assert parse_scale(given) == scale


@pytest.mark.parametrize("bad", ["huge", "0", "-1", "nan", "100"])
def test_a_bad_scale_says_what_is_allowed(bad):
    with pytest.raises(ConfigError, match="--scale"):
        parse_scale(bad)


# -- fitting what devices measured ---------------------------------------------------------------------------------
def true_kernel_us(k: dict) -> float:
    """A made-up device: a kernel costs 3 us plus 1 ns per MAC (int8 at half that)."""
    kernel = Kernel(**k)
    return 3.0 + kernel.macs * (0.5e-3 if kernel.int8 else 1e-3)


def measure(built, slow_group: int | None = None, factor: float = 1.0, groups: set[int] | None = None):
    """What a device of the made-up cost model reports for each case (median_ms...), every figure of
    ``slow_group`` (its probe included) ``factor`` times slower: the device drifted while it timed that group."""
    meta, out = built.suite.extra["cases"], {}
    for c in built.suite.cases:
        if groups is not None and c.group not in groups:
            continue
        m = meta[c.id]
        if m["role"] in ("prefix", "kernel"):
            elements = int(np.prod(m["shape"]))
            ms = 0.004 + elements * 1e-8 + (true_kernel_us(m["kernel"]) / 1e3 if m["role"] == "kernel" else 0)
        elif m["role"] == "model":
            ms = 0.005 + sum(true_kernel_us(k.to_dict()) for k in kernels_of(built.file(c.id))) / 1e3
        elif m["role"] == "probe":
            ms = 0.05
        else:
            ms = {"peak-fp32": 1.0, "peak-int8": 0.4, "bandwidth": 4.0}[c.id]
        ms *= factor if c.group == slow_group else 1.0
        out[c.id] = {"id": c.id, "median_ms": ms, "p10_ms": ms * 0.95, "p90_ms": ms * 1.05, "runs": 20, "rounds": 5}
    return out


def test_kernels_are_full_minus_prefix_on_one_speed_scale_and_devices_combine_by_median(built):
    meta = built.suite.extra["cases"]
    a = measure(built)
    b = measure(built, slow_group=1, factor=1.6)  # drifted in group 1: its probe says so, and is divided out
    c = {k: {**r, "median_ms": r["median_ms"] * 1.2} for k, r in measure(built, groups={0}).items()}  # partial
    m = combine(built.suite, {"a": a, "b": b})
    assert m.reference_ms == pytest.approx(0.05) and m.counts == {"a": len(a), "b": len(b)}
    for cid, us in m.kernel_us.items():
        assert us == pytest.approx(true_kernel_us(meta[cid]["kernel"]), rel=1e-6)
    three = combine(built.suite, {"a": a, "b": b, "c": c})
    group0 = [x.id for x in built.suite.cases if x.group == 0 and meta[x.id]["role"] == "prefix"]
    for cid in group0:  # the median of 1.0, 1.0 and 1.2 times the figure
        assert three.ms[cid] == pytest.approx(a[cid]["median_ms"])
    only_two = next(x.id for x in built.suite.cases if x.group == 1 and meta[x.id]["role"] == "prefix")
    assert three.ms[only_two] == pytest.approx(a[only_two]["median_ms"])  # c never timed it
    # two devices: the median is their mean
    pair = combine(built.suite, {"a": a, "c": c})
    assert pair.ms[group0[0]] == pytest.approx(1.1 * a[group0[0]]["median_ms"])


@pytest.fixture
def user_targets(tmp_path, monkeypatch):
    d = tmp_path / "targets"
    monkeypatch.setenv("EDGEFLEET_TARGETS_DIR", str(d))
    return d


def provenance(devices):
    return {"target": "host", "devices": devices, "date": dt.date.today().isoformat(),
            "agent_versions": dict.fromkeys(devices, "0.9"), "samples": dict.fromkeys(devices, 62)}


def test_the_fit_recovers_the_devices_costs_and_is_written_with_its_provenance(built, user_targets):
    from pipeline.profile import predict_model
    from pipeline.targets import kernels_file

    host = load_target("host")
    fitted = fit_calibration(built, {"a": measure(built), "b": measure(built, slow_group=0, factor=1.3)}, host)
    kfit = fitted["kernel_fit"]
    assert kfit["kernels"] == len([m for m in built.suite.extra["cases"].values() if m["role"] == "kernel"])
    assert kfit["models"] == 8 and kfit["median_abs_error_pct"] < 15  # the made-up cost model is additive
    assert fitted["peaks"]["gflops_fp32"] == pytest.approx(2 * 256 * 128 * 9 * 784 / 0.95e-3 / 1e9, rel=0.01)  # its p10
    assert fitted["ops"]["fit"]["models"] == 8 and "conv" in fitted["ops"]["ops"]

    written = store_calibration(fitted, host, provenance(["a", "b"]))
    assert written["kernels"] == str(user_targets / "host.kernels.json")
    assert written["target"] == str(user_targets / "host.yaml")
    data = json.loads((user_targets / "host.kernels.json").read_text())
    cal = data["meta"]["calibration"]
    assert cal["devices"] == ["a", "b"] and cal["fit"]["models"] == 8 and cal["peaks"] == fitted["peaks"]
    assert "measured by `pipeline targets calibrate --target host`" in (user_targets / "host.yaml").read_text()

    calibrated = load_target("host")  # the user directory's host.yaml now
    assert calibrated.efficiency.ops and calibrated.cpu.peak_gflops_fp32 == fitted["peaks"]["gflops_fp32"]
    assert kernels_file("host") == user_targets / "host.kernels.json"
    model = built.file("m0")
    p = predict_model(model, calibrated)
    assert p["basis"].startswith(f"calibrated from 2 devices on {dt.date.today().isoformat()}")
    assert p["calibration"]["devices"] == ["a", "b"]
    assert p["latency_ms"] == pytest.approx(KernelPredictor.load(user_targets / "host.kernels.json").predict_ms(model),
                                            abs=1e-4)


def test_a_packaged_class_calibrated_from_its_devices_keeps_its_yaml(built, user_targets):
    from pipeline.profile import predict_model
    from pipeline.targets import kernels_file, packaged_dir, target_file

    rpi4 = load_target("rpi4")
    before = predict_model(built.file("m1"), rpi4)
    assert before["basis"].startswith("roofline only, uncalibrated")
    fitted = fit_calibration(built, {"pi-1": measure(built)}, rpi4)
    written = store_calibration(fitted, rpi4, {**provenance(["pi-1"]), "target": "rpi4"})
    assert set(written) == {"kernels"} and target_file("rpi4") == packaged_dir() / "rpi4.yaml"
    assert kernels_file("rpi4") == user_targets / "rpi4.kernels.json"
    after = predict_model(built.file("m1"), rpi4)
    assert after["basis"].startswith("calibrated from 1 device on ") and after["latency_ms"] != before["latency_ms"]


def run_cli(tmp_path, *args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGEFLEET_TARGETS_DIR": str(tmp_path / "targets")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "targets", "calibrate", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--target", "toaster"], 2, "unknown target 'toaster'; known: "),
    ([], 2, "--target is required (known: "),
    (["--target", "rpi4"], 4, "no devices of class rpi4: deploy.yaml's fleet.devices and the fleet store"),
    (["--target", "rpi4", "--device", "pi-1"], 2, "needs the broker they are connected to: set fleet.broker"),
    (["--target", "rpi4", "--device", "a/b"], 2, "--device 'a/b' is not valid"),
    (["--target", "host", "--scale", "huge"], 2, "--scale: expected one of tiny, small, full or a number"),
    (["--target", "host", "--timeout", "0"], 2, "--timeout: expected a positive number"),
])
def test_calibrate_errors_name_what_is_wrong(tmp_path, args, code, says):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert says in " ".join(proc.stderr.split()), proc.stderr[-2000:]
    assert not (tmp_path / "targets").exists()  # nothing written
