"""bench/soak.py end to end, small: 40 simulated devices (real MQTT sessions, the agent's protocol) send metrics 4
times a second for 15 s into a persistent Mosquitto, two ``pipeline fleet ingest`` processes in one share group
store them; mid-run the broker restarts and one ingester is killed with SIGKILL and started again. Every message the
broker acknowledged is stored exactly once; while Mosquitto forgets shared subscriptions on a restart, those sent in
the seconds after it may be lost, and the test says so (xfail) once everything else held."""

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
    # at most once (UNIQUE (device_id, ts)), and nothing stored that no device sent
    assert (store["stored_twice"], store["phantom"]) == (0, 0), store
    assert store["stored"] == store["acked"] - store["missing"]
    if store["missing"]:
        # lost only in the seconds after the broker's restart, never through the ingester's kill or elsewhere
        first, last = store["missing_after_restart_s"]
        assert 0 <= first <= last <= 10, store
        pytest.xfail(f"{r['broker']}: {store['missing']} acknowledged messages sent {first:g}-{last:g} s after the "
                     f"restart were lost ({store['missing_unrouted']} acknowledged with 'no matching subscribers'): "
                     "the broker restores the ingesters' persistent sessions and queues but not their shared "
                     "subscriptions, so until they subscribe again nobody takes the fleet's telemetry")
    assert r["ok"] and run.returncode == 0
