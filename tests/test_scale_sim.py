"""bench/scale.py --sim end to end, small: 40 simulated devices (bench/transfersim.py: the agent's own transfer code,
two processes of one event loop each, a real MQTT session per device) take the bench's ~1 MB model from the host's
real delivery on a real Mosquitto: once broadcast, once broadcast while 4 of them drop off mid-transfer (an abrupt
cut, then back from what is on disk), with their broker sessions kept or lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, require

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("session", ["kept", "lost"])
def test_simulated_devices_that_drop_off_mid_broadcast_come_back_and_activate(tmp_path, session):
    from pipeline.broker import mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--sim", "--devices", "40", "--modes", "broadcast",
           "--drop", "0.1", "--drop-session", session, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    broadcast, drop = json.loads(out.read_text())["rows"]
    for r in (broadcast, drop):
        assert r["fleet"] == "simulated" and r["activated"] == 40, r["not_activated"]
        assert r["sim"]["errors"] == 0 and r["sim"]["broadcast_refused"] == 0
        assert r["broadcast_bytes"] >= r["artifact_bytes"]  # every chunk went once on the artifact topic
    assert broadcast["egress_x_artifact"] < 1.01 and broadcast["repair_bytes"] == 0
    assert drop["dropped"] == drop["dropped_back"] == drop["dropped_activated"] == 4 and drop["drop_missed"] == 0
    assert drop["others_repair_chunks"] == 0  # the devices that stayed took the broadcast alone
    if session == "kept":
        # the broker queued what was broadcast while they were away, and redelivered it: nothing to repair
        assert drop["dropped_repair_chunks"] == 0 and drop["egress_x_artifact"] < 1.01
    else:
        # what was broadcast while they were away is gone: each asks for what it lacks, and the host serves the
        # chunks several want once on the artifact topic; never more than one artifact per device that dropped
        assert drop["dropped_repair_chunks"] > 0 and drop["repair_bytes"] > 0
        assert drop["egress_x_artifact"] < 1 + drop["dropped"]
    assert run.returncode == 0


def test_a_simulated_link_of_k_kbit_s_takes_the_time_such_a_link_would(tmp_path):
    """--link-kbps: each device reads no faster than its link, so one artifact takes at least its bytes over the
    link's speed, for one device and for a wave alike (the broker's sends wait in TCP meanwhile)."""
    from pipeline.broker import mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    out = tmp_path / "scale.json"
    kbps = 4000
    cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--sim", "--devices", "1,10", "--modes", "broadcast",
           "--link-kbps", str(kbps), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["options"]["link_kbps"] == kbps
    for r in result["rows"]:
        assert r["activated"] == r["devices"] and r["egress_x_artifact"] < 1.01
        floor = r["artifact_bytes"] * 8 / (kbps * 1000)  # ~2.1 s; loopback alone takes ~0.1 s
        assert r["download_s"] >= 0.9 * floor, (r["download_s"], floor)
    assert run.returncode == 0
