"""A calibration job through a real Mosquitto and a real agent process: signed, chunked, verified, timed off the
network thread, reported on the calibration leaf; never installed; replays refused; a kill mid-suite resumed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from calibration_suites import conv, four_models, suite_zip
from conftest import make_artifact
from device_agent.protocol import Calibration, Event, Leaf, Status, StreamGet, encode, encode_chunk, parse_topic, topic
from pipeline.bundle import build_artifact
from pipeline.ota import LocalFleet, deliver
from pipeline.ota.watch import Watch

pytestmark = pytest.mark.slow  # delivers end to end through a real broker
PREFIX = "edgefleet"


@pytest.fixture
def fleet(mosquitto, key_dir, tmp_path):
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX,
                    threads=1) as f:
        yield f


def calibration_artifact(payload, out, key_dir, version, target="rpi4"):
    """What the host ships: the suite's zip, signed as a ``calibration`` artifact."""
    return build_artifact(payload, out, name="cal", version=version, target=target, runtime="onnxruntime",
                          golden_inputs=None, budgets={}, predicted={}, health={}, key_dir=key_dir,
                          kind="calibration")


class Host:
    """The host's side of one device: publishes jobs, serves their chunks, keeps what the device says."""

    def __init__(self, broker, device: str) -> None:
        self.device, self.artifacts = device, {}
        self.calibrations: list[Calibration] = []
        self.statuses: list[Status] = []
        self.events: list[Event] = []
        leaves = (Leaf.STATUS, Leaf.EVENTS, Leaf.STREAM_GET, Leaf.CALIBRATION)
        self.watch = Watch(broker, PREFIX, [(topic(PREFIX, device, leaf), 1) for leaf in leaves], self._on,
                           name="test-host", fresh_only=True)

    def _on(self, name: str, payload: bytes) -> None:
        _, leaf = parse_topic(PREFIX, name)
        if leaf is Leaf.STREAM_GET:
            req = StreamGet.parse(payload)
            art = self.artifacts[req.job_id]
            data = art.model_path.read_bytes()
            size = art.manifest.chunk_size
            for i in req.chunks:
                self.watch.publish(topic(PREFIX, self.device, Leaf.STREAM_DATA),
                                   encode_chunk(req.job_id, i, data[i * size:(i + 1) * size]))
        elif leaf is Leaf.CALIBRATION:
            self.calibrations.append(Calibration.parse(payload))
        elif leaf is Leaf.STATUS:
            self.statuses.append(Status.parse(payload))
        elif leaf is Leaf.EVENTS:
            self.events.append(Event.parse(payload))

    def send(self, job_id: str, artifact) -> None:
        self.artifacts[job_id] = artifact
        self.watch.publish(topic(PREFIX, self.device, Leaf.JOB),
                           encode({"job_id": job_id, "manifest": artifact.envelope}), retain=True)

    def finished(self, job_id: str) -> bool:
        return any(c.finished and c.job_id == job_id for c in self.calibrations)

    def event(self, kind: str, job_id: str) -> Event | None:
        return next((e for e in self.events if e.kind == kind and e.job_id == job_id), None)

    def results(self, job_id: str) -> dict[str, dict]:
        return {r["id"]: r for c in self.calibrations if c.job_id == job_id for r in c.results}

    def __enter__(self) -> "Host":
        self.watch.start()
        return self

    def __exit__(self, *exc) -> None:
        self.watch.stop()
        if exc[0] is None:  # whatever else happened, the agent never failed handling a message
            assert not [e for e in self.events if e.kind in ("handler_error", "agent_error", "protocol_error")]


def local_state(fleet) -> dict:
    out = subprocess.run([sys.executable, "-m", "device_agent.cli", "status", "--config",
                          str(fleet.config_path(fleet.device_ids[0]))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_calibration_job_is_timed_and_reported_never_installed(mosquitto, fleet, tiny_onnx, key_dir, tmp_path):
    device = fleet.device_ids[0]
    [r] = deliver(mosquitto.config, PREFIX, make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=10),
                  fleet.device_ids, 60)
    assert r.status == "activated" and r.active_version == 10
    payload, suite = suite_zip(tmp_path / "suite.zip", four_models(tmp_path / "m"),
                               {"first": 0, "dw": 0, "gemm": 1, "relu": 1}, rounds=3, runs=10, warmup=1)
    art = calibration_artifact(payload, tmp_path / "c", key_dir, version=100)
    assert art.manifest.kind == "calibration" and art.manifest.golden == {}

    with Host(mosquitto.config, device) as host:
        host.send("cal-1", art)
        assert host.watch.until(lambda: host.finished("cal-1") and host.event("calibrated", "cal-1"), 60), \
            (host.calibrations, host.events, fleet.log_tail(device))
        final = [c for c in host.calibrations if c.finished][-1]
        assert final.error is None and final.done == final.total == 4 and final.version == 100
        results = host.results("cal-1")
        assert set(results) == {"first", "dw", "gemm", "relu"}
        assert all(x["p10_ms"] <= x["median_ms"] <= x["p90_ms"] and x["rounds"] == 3 for x in results.values())
        assert final.env["threads"] == 1 and final.env["runtime"] == "onnxruntime" and final.env["agent_version"]
        states = [s.state for s in host.statuses if s.job_id == "cal-1"]
        assert states[0] == "downloading" and "verifying" in states and "calibrating" in states
        assert states[-1] == "idle" and "installing" not in states and "testing" not in states
        assert all(s.active_version == 10 for s in host.statuses)
        assert "timed 4 of 4 cases" in host.event("calibrated", "cal-1").message
        assert host.event("calibration_started", "cal-1") is not None

        # the same signed calibration again under another job id: a replay, refused; nothing else moves
        host.send("cal-2", art)
        assert host.watch.until(lambda: host.event("refused", "cal-2"), 30), host.events
        assert "not newer than 100" in host.event("refused", "cal-2").message
        assert not any(c.job_id == "cal-2" for c in host.calibrations)
        work = fleet.config_path(device).parent / "state" / "calibration" / "cal-1"
        assert sorted(p.name for p in work.iterdir()) == ["progress.json"]  # the payload and its files are gone

        # signed, but its payload is no suite: accepted, then failed with the reason; the agent goes on
        (tmp_path / "junk.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
        host.send("cal-3", calibration_artifact(tmp_path / "junk.zip", tmp_path / "j", key_dir, version=101))
        assert host.watch.until(lambda: host.event("calibration_failed", "cal-3"), 30), host.events
        failed = [s for s in host.statuses if s.job_id == "cal-3"][-1]
        assert failed.state == "failed" and "holds no suite.json" in failed.reason and failed.result_code == 6

    state = local_state(fleet)
    assert state["active"]["version"] == 10 and state["state"]["highest_version"] == 10
    assert state["state"]["highest_calibration"] == 101 and state["state"]["calibration"]["finished"] is True

    # a model after a calibration still needs only to be newer than the last model
    [r] = deliver(mosquitto.config, PREFIX, make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=11),
                  fleet.device_ids, 60)
    assert r.status == "activated" and r.active_version == 11


def test_an_agent_killed_mid_suite_resumes_where_it_was(mosquitto, fleet, key_dir, tmp_path):
    device = fleet.device_ids[0]
    d = tmp_path / "m"
    d.mkdir()
    models = {f"c{i}": conv(d / f"c{i}.onnx", 32, 32, 64, seed=i) for i in range(10)}  # ~1 ms a run here
    payload, _ = suite_zip(tmp_path / "suite.zip", models, {f"c{i}": i // 2 for i in range(10)}, rounds=3, runs=100,
                           warmup=1)
    art = calibration_artifact(payload, tmp_path / "c", key_dir, version=200)
    with Host(mosquitto.config, device) as host:
        host.send("cal-k", art)
        assert host.watch.until(lambda: any(c.results for c in host.calibrations), 60), fleet.log_tail(device)
        fleet.procs[device].kill()  # kill -9 while the next group is being timed
        fleet.procs[device].wait()
        before = dict(host.results("cal-k"))
        assert not host.finished("cal-k") and 0 < len(before) < 10, before
        fleet.spawn(device)
        assert host.watch.until(lambda: host.finished("cal-k"), 90), (host.calibrations, fleet.log_tail(device))
        assert host.event("resumed", "cal-k") is not None
        final = [c for c in host.calibrations if c.finished][-1]
        assert final.error is None and final.done == final.total == 10
        after = host.results("cal-k")
        assert set(after) == set(models)
        assert all(after[k] == v for k, v in before.items())  # reported again from disk, not timed again


def test_a_new_calibration_supersedes_a_running_one(mosquitto, fleet, key_dir, tmp_path):
    device = fleet.device_ids[0]
    d = tmp_path / "m"
    d.mkdir()
    slow = {f"s{i}": conv(d / f"s{i}.onnx", 16, 16, 48, seed=i) for i in range(6)}
    payload, _ = suite_zip(tmp_path / "slow.zip", slow, {k: i for i, k in enumerate(slow)}, rounds=5, runs=200)
    quick, _ = suite_zip(tmp_path / "quick.zip", four_models(tmp_path / "q"), {}, rounds=1, runs=2, warmup=0)
    first = calibration_artifact(payload, tmp_path / "c1", key_dir, version=300)
    second = calibration_artifact(quick, tmp_path / "c2", key_dir, version=301)
    with Host(mosquitto.config, device) as host:
        host.send("cal-a", first)
        assert host.watch.until(lambda: any(s.state == "calibrating" and s.job_id == "cal-a"
                                            for s in host.statuses), 60), fleet.log_tail(device)
        host.send("cal-b", second)
        assert host.watch.until(lambda: host.finished("cal-a") and host.finished("cal-b"), 60), \
            (host.calibrations, fleet.log_tail(device))
        stopped = next(c for c in host.calibrations if c.job_id == "cal-a" and c.finished)
        assert stopped.error == "superseded by job cal-b" and stopped.done < 6
        done = next(c for c in host.calibrations if c.job_id == "cal-b" and c.finished)
        assert done.error is None and done.done == 4
        # the first one's thread had ended before the second one timed anything: one calibration at a time
        order = [(c.job_id, c.finished) for c in host.calibrations]
        assert order.index(("cal-a", True)) < min(i for i, (j, _) in enumerate(order) if j == "cal-b")
    assert local_state(fleet)["state"]["highest_calibration"] == 301
