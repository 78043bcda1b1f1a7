"""Collecting a calibration (pipeline.ota.calibration): what the devices say, merged by (device, case id), every
message checked by the protocol's own parser; and on a real Mosquitto, a device that never answers is reported
when the timeout passes and the retained job is cleared behind the run."""

from __future__ import annotations

import zipfile

import pytest

from device_agent.calibration import SUITE_FILE, Case, Suite
from device_agent.protocol import Calibration, Event, Leaf, Status, encode, topic
from pipeline.ota.calibration import CalibrationStatus, Collector, run_calibration_job
from pipeline.ota.watch import Watch

PREFIX = "edgefleet"
CASES = {"probe0", "k0p", "k0", "m0"}


def result(case_id: str, ms: float) -> dict:
    return {"id": case_id, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "runs": 20, "rounds": 5}


def message(device: str, results: list[dict], done: int, finished: bool = False, error: str | None = None,
            job_id: str = "c7-abc", version: int = 7) -> bytes:
    return encode(Calibration(device_id=device, job_id=job_id, version=version, done=done, total=len(CASES),
                              results=results, finished=finished, error=error,
                              env={"agent_version": "0.9", "runtime_version": "1.32", "cpu": "Cortex-A72"}))


def collector(devices=("a", "b", "c")) -> tuple[Collector, list[str]]:
    moved: list[str] = []
    return Collector(PREFIX, "c7-abc", 7, list(devices), CASES, lambda d: moved.append(d.device_id)), moved


def test_results_merge_by_case_id_and_a_case_timed_again_replaces_the_first():
    c, moved = collector()
    t = topic(PREFIX, "a", Leaf.CALIBRATION)
    first = message("a", [result("probe0", 0.05), result("k0p", 0.2)], done=2)
    c.handle(t, first)
    c.handle(t, first)  # QoS 1 redelivered: nothing changes
    a = c.devices["a"]
    assert a.status is CalibrationStatus.RUNNING and a.done == 2 and a.results["k0p"]["median_ms"] == 0.2
    # the agent restarted mid-suite: it reports again what it had, and re-times k0p
    c.handle(t, message("a", [result("probe0", 0.05), result("k0p", 0.25), result("k0", 0.3)], done=3))
    assert a.results["k0p"]["median_ms"] == 0.25 and len(a.results) == 3 and a.done == 3
    c.handle(t, message("a", [result("m0", 1.0)], done=4, finished=True))
    assert a.status is CalibrationStatus.FINISHED and a.env["cpu"] == "Cortex-A72" and a.messages == 4
    assert moved.count("a") == 4 and not c.settled()


def test_what_does_not_fit_is_refused_and_counted_never_raised():
    c, _ = collector()
    t = topic(PREFIX, "b", Leaf.CALIBRATION)
    for payload in (b"\xff", b"[]", b'{"v": 1}', message("b", [result("nope", 1.0)], done=1),
                    message("b", [{"id": "k0", "median_ms": -1, "p10_ms": 0, "p90_ms": 0}], done=1),
                    message("a", [result("k0", 1.0)], done=1),  # another device's message on b's topic
                    message("b", [result("k0", 1.0)], done=1, version=6)):
        c.handle(t, payload)
    b = c.devices["b"]
    assert b.refused_messages == 7 and b.results == {} and b.status is CalibrationStatus.PENDING
    c.handle(t, message("b", [result("k0", 1.0)], done=1, job_id="c6-old"))  # another job's: not ours, not refused
    c.handle(topic(PREFIX, "stranger", Leaf.CALIBRATION), message("stranger", [result("k0", 1.0)], done=1))
    assert b.refused_messages == 7 and b.results == {} and "stranger" not in c.devices


def test_a_refusal_a_failure_and_an_early_stop_each_settle_a_device():
    c, _ = collector()
    c.handle(topic(PREFIX, "a", Leaf.EVENTS), encode(Event(device_id="a", kind="refused", job_id="c7-abc",
                                                            message="target rpi4 is not this device's (host)")))
    c.handle(topic(PREFIX, "b", Leaf.STATUS), encode(Status(device_id="b", state="downloading", target="host",
                                                             job_id="c7-abc")))
    assert c.devices["b"].status is CalibrationStatus.DOWNLOADING
    c.handle(topic(PREFIX, "b", Leaf.STATUS), encode(Status(device_id="b", state="failed", target="host",
                                                             job_id="c7-abc", reason="sha256 mismatch")))
    c.handle(topic(PREFIX, "c", Leaf.CALIBRATION), message("c", [result("k0", 1.0)], done=1, finished=True,
                                                            error="budget of 900 s spent"))
    assert c.devices["a"].status is CalibrationStatus.REFUSED and "rpi4" in c.devices["a"].reason
    assert c.devices["b"].status is CalibrationStatus.FAILED and c.devices["b"].reason == "sha256 mismatch"
    assert c.devices["c"].status is CalibrationStatus.STOPPED and c.devices["c"].results
    assert c.settled()


@pytest.fixture
def artifact(tmp_path, key_dir):
    import onnx
    from onnx import TensorProto, helper

    from pipeline.bundle import build_artifact

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "probe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    suite = Suite(name="t", cases=(Case("probe0", "probe.onnx", (1, 4)),), budget_s=30)
    zip_path = tmp_path / "t.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr(SUITE_FILE, suite.to_json())
        z.write(path, "probe.onnx")
    return build_artifact(zip_path, tmp_path / "art", name="t-calibration", version=9, target="host",
                          runtime="onnxruntime", golden_inputs=None, budgets={}, predicted={}, health={},
                          key_dir=key_dir, kind="calibration")


def test_a_device_that_never_answers_is_reported_and_the_job_is_cleared(mosquitto, artifact):
    assert artifact.manifest.kind == "calibration" and artifact.manifest.golden == {}
    run = run_calibration_job(mosquitto.config, PREFIX, artifact, ["ghost-1"], {"probe0"}, timeout_s=1.5)
    [ghost] = run.devices
    assert ghost.status is CalibrationStatus.TIMEOUT and run.unfinished == ["ghost-1"]
    assert "not finished within 1.5 s (0 of 1 cases" in ghost.reason
    retained: list[bytes] = []
    with Watch(mosquitto.config, PREFIX, [(topic(PREFIX, "ghost-1", Leaf.JOB), 1)],
               lambda t, p: retained.append(p)) as w:
        assert w.settle(10)
    assert retained == []  # no device starts this suite later with nobody listening


def test_a_device_of_another_class_refuses_the_job_and_says_why(mosquitto, artifact, key_dir, tmp_path):
    """A real agent process of class rpi4 given host's suite: refused (an event naming the class), never timed."""
    from pipeline.bundle import public_key_path
    from pipeline.ota.local_fleet import LocalFleet

    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, public_key_path(key_dir), PREFIX) as fleet:
        run = run_calibration_job(mosquitto.config, PREFIX, artifact, fleet.device_ids, {"probe0"}, timeout_s=30)
    [d] = run.devices
    assert d.status is CalibrationStatus.REFUSED and d.results == {} and run.unfinished == ["rpi4-emu-0"]
    assert "host" in d.reason and "rpi4" in d.reason, d.reason
