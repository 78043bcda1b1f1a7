"""Telemetry ingest on a real Mosquitto: a crash of the ingester between batches loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from device_agent.mqtt import MqttLink
from device_agent.protocol import Metrics, encode
from pipeline.fleet import FleetStore

pytestmark = pytest.mark.slow


def ingester(mosquitto, db):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fleet", "ingest", "--broker",
                             f"127.0.0.1:{mosquitto.port}", "--db", str(db)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stored(db) -> int:
    if not db.exists():
        return 0
    s = FleetStore(db)
    try:
        return s.count("metrics")
    finally:
        s.close()


def test_a_killed_ingester_loses_no_acknowledged_message(mosquitto, tmp_path):
    db = tmp_path / "fleet.db"
    proc = ingester(mosquitto, db)
    time.sleep(2.0)  # its persistent session and subscriptions now exist on the broker
    pub = MqttLink(mosquitto.config, "simulated-devices", lambda t, p: None).start()
    sent, t0 = 0, time.time()  # recent: older rows would be rolled up by the ingester's retention
    try:
        for i in range(600):
            device = f"sim-{i % 3}"
            m = Metrics(device, 1, 1.0 + i % 7, 2.0, 80.0, 10, True, ts=t0 + i / 1000)
            pub.publish(f"edgefleet/v1/{device}/metrics", encode(m), qos=1).wait_for_publish(5)
            sent += 1
            if i == 300:
                proc.kill()  # kill -9 between (or during) batches
                proc.wait()
    finally:
        pub.stop()
    proc = ingester(mosquitto, db)  # back up: the broker delivers what was queued or never acknowledged
    try:
        deadline = time.monotonic() + 30
        while stored(db) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert stored(db) == sent == 600

    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--db", str(db), "--json"],
                            capture_output=True, text=True, check=True)
    devices = json.loads(status.stdout)
    assert [d["device_id"] for d in devices] == ["sim-0", "sim-1", "sim-2"]
    assert all(d["metrics"]["rss_mb"] == 80.0 and d["active_version"] == 1 for d in devices)
