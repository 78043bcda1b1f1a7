"""Canary rollouts, aborts and rollbacks with real agents and a real Mosquitto: every status recorded is what
the device said (a confirmed rollback, a refusal, or no answer), and emulated agents are judged against this
host, never against the target's budget."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading

import pytest
import yaml

from conftest import REPO, make_artifact, small_deploy_config
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from pipeline.ota import LocalFleet
from pipeline.ota.commands import roll_back
from pipeline.ota.rollout import RolloutPolicy, rollout
from pipeline.ota.status import DeviceStatus

pytestmark = pytest.mark.slow

#: a latency no device can reach: whatever is judged against it fails
IMPOSSIBLE_MS = 1e-6


def predicted_artifact(model, out, key_dir, version: int, latency_ms: float = 1.0):
    """``make_artifact``'s, with a prediction for the target in its manifest (what deploy signs)."""
    import numpy as np

    from pipeline.bundle import build_artifact

    x = np.random.default_rng(version).random((3, 1, 8, 8), dtype=np.float32)
    return build_artifact(model, out, name="tiny", version=version, target="rpi4", runtime="onnxruntime",
                          golden_inputs=x, budgets={}, predicted={"latency_ms": latency_ms}, health={"runs": 5},
                          key_dir=key_dir)


def active_versions(fleet) -> dict[str, int | None]:
    out = {}
    for d in fleet.device_ids:
        proc = subprocess.run([sys.executable, "-m", "device_agent.cli", "status", "--config",
                               str(fleet.config_path(d))], capture_output=True, text=True, check=True)
        active = json.loads(proc.stdout)["active"]
        out[d] = active["version"] if active else None
    return out


@contextlib.contextmanager
def device_agent(broker, key_dir, state_dir, device_id="pi-real"):
    """A real (not emulated) agent in this process: its metrics say ``emulated: false``."""
    agent = Agent(AgentConfig(device_id=device_id, target="rpi4", state_dir=state_dir,
                              trusted_keys=(key_dir / "signing.pub",), broker=broker, benchmark_runs=5))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        yield device_id
    finally:
        agent.stop()
        t.join(10)


def test_a_canary_slower_than_this_host_predicts_aborts_and_confirms_its_rollback(mosquitto, key_dir, tiny_onnx,
                                                                                   tmp_path):
    with LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 3, key_dir / "signing.pub", "edgefleet") as fleet:
        v1 = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=60)
        first = rollout(mosquitto.config, "edgefleet", v1, fleet.device_ids, 60, RolloutPolicy(canary_fraction=0.3))
        assert not first.aborted and [r.status for r in first.results] == [DeviceStatus.ACTIVATED] * 3
        assert first.phases == {"rpi4-emu-0": "canary", "rpi4-emu-1": "rollout", "rpi4-emu-2": "rollout"}

        v2 = predicted_artifact(tiny_onnx, tmp_path / "b", key_dir, version=61, latency_ms=1.0)
        # this host runs it far slower than predicted for it: the target's prediction, scaled alike, is over
        strict = RolloutPolicy(canary_fraction=0.3, latency_p95_ms=10.0, host_latency_ms=IMPOSSIBLE_MS)
        second = rollout(mosquitto.config, "edgefleet", v2, fleet.device_ids, 60, strict)
        assert second.aborted and "rpi4-emu-0 (emulated: p50" in second.reason, second.reason
        assert "scaled alike" in second.reason and "over the 10 ms budget" in second.reason
        assert [r.device_id for r in second.results] == ["rpi4-emu-0"]  # the others were never touched
        [r] = second.results
        # recorded because the device said so: its rolled_back event, its status back on v60
        assert r.status is DeviceStatus.ROLLED_BACK and r.active_version == 60, r.reason
        assert r.device_state == "activated" and r.events[-1]["kind"] == "rolled_back"
        assert second.to_dict()["limits"]["host_predicted_latency_ms"] == IMPOSSIBLE_MS
        # the device confirmed after persisting its switch: nothing to wait for
        assert active_versions(fleet) == {"rpi4-emu-0": 60, "rpi4-emu-1": 60, "rpi4-emu-2": 60}


def test_an_abort_on_a_first_deployment_records_the_refusal(mosquitto, key_dir, tiny_onnx, tmp_path):
    with LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", "edgefleet") as fleet:
        art = predicted_artifact(tiny_onnx, tmp_path / "a", key_dir, version=70)
        result = rollout(mosquitto.config, "edgefleet", art, fleet.device_ids, 60,
                         RolloutPolicy(latency_p95_ms=10.0, host_latency_ms=IMPOSSIBLE_MS))
        assert result.aborted
        [r] = result.results
        # nothing to go back to: the device says so and keeps v70; never recorded as rolled back
        assert r.status is DeviceStatus.ROLLBACK_REFUSED and r.active_version == 70, r.reason
        assert "no good model" in r.reason and r.to_dict()["status"] == "rollback_refused"
        assert r.events[-1]["kind"] == "rollback_refused"
        assert active_versions(fleet) == {"rpi4-emu-0": 70}


def test_an_emulated_agent_is_not_judged_by_the_targets_budget(mosquitto, key_dir, tiny_onnx, tmp_path):
    with LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", "edgefleet") as fleet:
        art = predicted_artifact(tiny_onnx, tmp_path / "a", key_dir, version=75, latency_ms=1.0)
        # rpi4's budget 10 ms, which this host's p95 may well exceed when busy: the emulated agent's figure is
        # never held to it. Here this host runs the model well within what was predicted for it.
        policy = RolloutPolicy(latency_p95_ms=10.0, host_latency_ms=50.0)
        result = rollout(mosquitto.config, "edgefleet", art, fleet.device_ids, 60, policy)
        [r] = result.results
        assert not result.aborted and r.status is DeviceStatus.ACTIVATED, result.reason
        assert r.metrics["emulated"] is True
        # a budget no host can meet, and no prediction for this host: nothing emulated is judged at all
        art2 = predicted_artifact(tiny_onnx, tmp_path / "b", key_dir, version=76)
        again = rollout(mosquitto.config, "edgefleet", art2, fleet.device_ids, 60,
                        RolloutPolicy(latency_p95_ms=IMPOSSIBLE_MS))
        assert not again.aborted and again.results[0].status is DeviceStatus.ACTIVATED


def test_a_real_device_over_the_targets_budget_still_aborts(mosquitto, key_dir, tiny_onnx, tmp_path):
    with device_agent(mosquitto.config, key_dir, tmp_path / "state") as device:
        v1 = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=80)
        first = rollout(mosquitto.config, "edgefleet", v1, [device], 60, RolloutPolicy(latency_p95_ms=1e6))
        assert not first.aborted and first.results[0].metrics["emulated"] is False
        v2 = make_artifact(tiny_onnx, tmp_path / "b", key_dir, version=81)
        # a generous prediction for this host changes nothing: a real device meets its target's budget
        second = rollout(mosquitto.config, "edgefleet", v2, [device], 60,
                         RolloutPolicy(latency_p95_ms=IMPOSSIBLE_MS, host_latency_ms=1e6))
        assert second.aborted and f"over the {IMPOSSIBLE_MS:g} ms p95 budget" in second.reason
        [r] = second.results
        assert r.status is DeviceStatus.ROLLED_BACK and r.active_version == 80, r.reason


def test_a_device_that_never_answers_a_rollback_is_recorded_as_such(mosquitto):
    [a] = roll_back(mosquitto.config, "edgefleet", ["nobody-home"], timeout_s=1.0)
    assert a.status is DeviceStatus.NO_ANSWER and a.active_version is None and "no answer" in a.message


def test_deploy_records_the_refusal_in_the_report_table_store_and_telemetry(mosquitto, key_dir, tiny_onnx, tmp_path,
                                                                              monkeypatch, capsys):
    from pipeline.broker import external_broker
    from pipeline.config import load_deploy
    from pipeline.fleet import FleetStore
    from pipeline.ota import stage
    from pipeline.targets import target_for_deploy
    from pipeline.ui import UI
    from pipeline.ui import tables

    cfg = load_deploy(small_deploy_config(tmp_path, local_agents=1, local_broker="mosquitto"))
    target = target_for_deploy(cfg, "rpi4")
    workdir = cfg.resolve(cfg.workdir)
    art = predicted_artifact(tiny_onnx, tmp_path / "a", key_dir, version=90)
    # this host's prediction as no host can meet it: the canary is a regression, whatever the machine
    real = stage.host_prediction
    monkeypatch.setattr(stage, "host_prediction", lambda artifact: {**(real(artifact) or {}), "latency_ms": IMPOSSIBLE_MS})
    ui = UI()
    delivery, info = stage.deliver_stage(cfg.fleet, external_broker(cfg), target, art, workdir, ui)
    assert info["rollout"]["aborted"]
    [d] = delivery
    assert (d["status"], d["active_version"]) == ("rollback_refused", 90)
    assert tables.ACTIVATED == DeviceStatus.ACTIVATED  # the table colours what the enum says
    tables.print_delivery(ui, delivery, {"latency_ms": 1.0}, info["rollout"]["limits"])
    table = capsys.readouterr().err
    assert "rollback_refused" in table and "host predicted ms" in table and "rolled_back" not in table

    store = FleetStore(workdir / "fleet.db", readonly=True)
    try:
        [dep] = store.history("rpi4")
        assert dep["status"] == "aborted"
        assert [(r["status"], r["active_version"]) for r in store.results(dep["id"])] == [("rollback_refused", 90)]
        [device] = store.devices()
        # the fleet view holds what the device last said of itself: v90, active
        assert (device["state"], device["active_version"]) == ("activated", 90)
        assert "rollback_refused" in [e["kind"] for e in store.events(10)]
    finally:
        store.close()


def test_rollback_and_history_from_the_command_line(tmp_path):
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["model"]["train"]["epochs"] = 2
    data["data"] = {"name": "digits"}
    data["compress"] = [{"method": "magnitude", "sparsity": 0.5, "finetune_epochs": 0}]
    data["fleet"].update(local_agents=2, local_broker="mosquitto", timeout_s=60)
    data["fleet"]["rollout"] = {"canary_fraction": 0.5}
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(yaml.safe_dump(data))

    def cli(*args, code=0):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--config", str(cfg), "--json"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == code, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    v1 = cli("deploy", "--target", "rpi4")["artifact"]["version"]
    # one model on each device: nothing to go back to, and the command says so (exit 4, delivery incomplete)
    refused = cli("rollback", "--target", "rpi4", code=4)
    assert [d["status"] for d in refused["delivery"]] == ["rollback_refused"] * 2
    # the refusal names no version; a status the agent published as it started may have said it runs v1
    assert {d["active_version"] for d in refused["delivery"]} <= {None, v1}
    second = cli("deploy", "--target", "rpi4")
    v2 = second["artifact"]["version"]
    assert [d["phase"] for d in second["delivery"]] == ["canary", "rollout"]
    back = cli("rollback", "--target", "rpi4")
    assert [(d["status"], d["active_version"]) for d in back["delivery"]] == [("rolled_back", v1)] * 2
    forward = cli("rollback", "--target", "rpi4", "--to", str(v2))  # v2's model, signed again as v3
    v3 = forward["artifact"]["version"]
    assert v3 > v2 and forward["artifact"]["model_sha256"] == second["artifact"]["model_sha256"]
    assert [(d["status"], d["active_version"]) for d in forward["delivery"]] == [("activated", v3)] * 2
    history = cli("history", "--target", "rpi4")
    assert [h["kind"] for h in history] == ["rollback", "rollback", "deploy", "rollback", "deploy"]
    assert [h["status"] for h in history] == ["succeeded", "succeeded", "succeeded", "failed", "succeeded"]
    assert {d["status"] for d in history[3]["devices"]} == {"rollback_refused"}
    assert {d["status"] for d in history[1]["devices"]} == {"rolled_back"}
