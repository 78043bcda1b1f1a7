"""Canary rollouts, aborts and rollbacks with real agents and a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, make_artifact
from pipeline.ota import LocalFleet
from pipeline.ota.rollout import RolloutPolicy, rollout

pytestmark = pytest.mark.slow


def active_versions(fleet) -> dict[str, int | None]:
    out = {}
    for d in fleet.device_ids:
        proc = subprocess.run([sys.executable, "-m", "device_agent.cli", "status", "--config",
                               str(fleet.config_path(d))], capture_output=True, text=True, check=True)
        active = json.loads(proc.stdout)["active"]
        out[d] = active["version"] if active else None
    return out


def test_canary_regression_aborts_and_rolls_the_canary_back(mosquitto, key_dir, tiny_onnx, tmp_path):
    with LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 3, key_dir / "signing.pub", "edgefleet") as fleet:
        v1 = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=60)
        first = rollout(mosquitto.config, "edgefleet", v1, fleet.device_ids, 60, RolloutPolicy(canary_fraction=0.3))
        assert not first.aborted and [r.status for r in first.results] == ["activated"] * 3
        assert first.phases == {"rpi4-emu-0": "canary", "rpi4-emu-1": "rollout", "rpi4-emu-2": "rollout"}

        v2 = make_artifact(tiny_onnx, tmp_path / "b", key_dir, version=61)
        strict = RolloutPolicy(canary_fraction=0.3, latency_p95_ms=1e-6)  # no device can be that fast
        second = rollout(mosquitto.config, "edgefleet", v2, fleet.device_ids, 60, strict)
        assert second.aborted and "latency p95 over" in second.reason
        assert [r.device_id for r in second.results] == ["rpi4-emu-0"]  # the others were never touched
        assert second.results[0].status == "rolled_back"
        deadline = time.monotonic() + 10
        while active_versions(fleet)["rpi4-emu-0"] != 60 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert active_versions(fleet) == {"rpi4-emu-0": 60, "rpi4-emu-1": 60, "rpi4-emu-2": 60}


def test_rollback_and_history_from_the_command_line(tmp_path):
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["model"]["train"]["epochs"] = 2
    data["data"] = {"name": "digits"}
    data["compress"] = [{"method": "magnitude", "sparsity": 0.5, "finetune_epochs": 0}]
    data["fleet"].update(local_agents=2, local_broker="mosquitto", timeout_s=60)
    data["fleet"]["rollout"] = {"canary_fraction": 0.5}
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(yaml.safe_dump(data))

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--config", str(cfg), "--json"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    v1 = cli("deploy", "--target", "rpi4")["artifact"]["version"]
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
    assert [h["kind"] for h in history] == ["rollback", "rollback", "deploy", "deploy"]
    assert [h["status"] for h in history] == ["succeeded"] * 4
