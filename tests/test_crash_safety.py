"""kill -9 at each step of an activation: afterwards exactly one complete, verified model is active, and the
restarted agent finishes the update."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import make_artifact
from device_agent.faults import POINTS
from device_agent.manifest import file_sha256
from pipeline.ota import LocalFleet, deliver

pytestmark = pytest.mark.slow


def state(fleet) -> dict:
    out = subprocess.run([sys.executable, "-m", "device_agent.cli", "status", "--config",
                          str(fleet.config_path(fleet.device_ids[0]))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("point", POINTS)
def test_power_cut_during_activation_leaves_one_valid_model(point, mosquitto, key_dir, tiny_onnx, tmp_path):
    with LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", "edgefleet") as fleet:
        device = fleet.device_ids[0]
        [r] = deliver(mosquitto.config, "edgefleet", make_artifact(tiny_onnx, tmp_path / "a", key_dir, 70),
                      [device], 30)
        assert r.status == "activated"
        fleet.procs[device].terminate()
        fleet.procs[device].wait(10)
        agent = fleet.spawn(device, env={"EDGEFLEET_CRASH_AT": point})
        v2 = make_artifact(tiny_onnx, tmp_path / "b", key_dir, 71)
        box: dict = {}
        worker = threading.Thread(target=lambda: box.setdefault("r", deliver(mosquitto.config, "edgefleet", v2,
                                                                               [device], 60)[0]))
        worker.start()
        assert agent.wait(30) == -9, f"the agent did not reach {point}"

        s = state(fleet)
        active = s["active"]
        assert active is not None and active["version"] in (70, 71)
        slot_dir = fleet.config_path(device).parent / "state" / "slots" / active["slot"]
        model = next(p for p in slot_dir.iterdir() if p.suffix == ".onnx")
        assert file_sha256(model) == active["sha256"]  # complete and verified, not half-written

        fleet.spawn(device)  # the restarted agent picks the update up again and finishes it
        worker.join(90)
        assert box["r"].status == "activated" and box["r"].active_version == 71, box["r"].reason
        deadline = time.monotonic() + 5
        while state(fleet)["state"].get("highest_version") != 71 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state(fleet)["active"]["version"] == 71
