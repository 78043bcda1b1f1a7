"""bench/soak.py end to end, small: 40 simulated devices (real MQTT sessions, the agent's protocol) send metrics 4
times a second for 15 s into a persistent Mosquitto, two ``pipeline fleet ingest`` processes in one share group
store them; mid-run the broker restarts and one ingester is killed with SIGKILL and started again. Every message the
broker acknowledged is stored exactly once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, require

pytestmark = pytest.mark.slow


def test_every_acknowledged_message_is_stored_once_through_a_broker_restart_and_an_ingester_kill(tmp_path):
    from pipeline.broker import mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "bench" / "soak.py"), "--devices", "40", "--seconds", "15", "--interval", "0.25",
           "--workers", "2", "--drain-s", "60", "--settle-s", "5", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.exists(), run.stderr[-3000:]
    r = json.loads(out.read_text())
    (store,) = r["stores"]
    assert r["faults"]["broker_restart"]["down_s"] > 0 and r["faults"]["ingester_kill"]["killed"] == ["soak0-a"]
    assert r["sim"]["drops"] >= 40 and r["sim"]["connects"] >= 80  # every device lost its connection and came back
    assert r["sim"]["sent"] == store["sent"] == 40 * 60 and r["sim"]["refused"] == 0
    assert store["acked"] == store["sent"]  # every message acknowledged in the end (paho sent again what was lost)
    assert store["ingester_lives"] == 3 and store["duplicates"] >= 0
    # at most once (UNIQUE (device_id, ts)), nothing stored that no device sent, and at least once for every message
    # the broker acknowledged: what a restarted Mosquitto acknowledged with 'no matching subscribers' (it forgets the
    # ingesters' shared subscriptions) the devices published again, as agents do, until an ingester took it
    assert (store["stored_twice"], store["phantom"], store["missing"]) == (0, 0, 0), store
    assert store["stored"] == store["acked"] and r["sim"]["given_up"] == 0
    assert r["sim"]["retried"] >= r["sim"]["unrouted_acks"]
    assert r["ok"] and run.returncode == 0
