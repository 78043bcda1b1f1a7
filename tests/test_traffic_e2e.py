"""Requests an application sends to a real agent's inference API reach the host: a real Mosquitto delivers a model
to a local agent process, a client calls it over the agent's socket, the agent reports when asked (the ``report``
command), the fleet ingester stores what it said, and ``pipeline fleet status --json`` and ``/metrics`` count the
same requests, also across a restart of the agent (its counters start again; the host's totals go on)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from fleet_probe import wait_subscribed

from conftest import make_artifact
from device_agent.client import Client, InferenceError
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, encode, topic
from pipeline.dashboard import Dashboard
from pipeline.fleet import FleetStore
from pipeline.fleet.ingest import Ingester
from pipeline.fleet.traffic import traffic_summary
from pipeline.ota import LocalFleet, deliver

pytestmark = pytest.mark.slow
PREFIX = "edgefleet"
BEFORE, AFTER = 25, 15  # requests answered before and after the agent restarts


def traffic_of(db, device: str) -> dict | None:
    store = FleetStore(db, readonly=True)
    try:
        return next((d for d in traffic_summary(store)["devices"] if d["device_id"] == device), None)
    finally:
        store.close()


def report_until(link: MqttLink, device: str, db, answered: int, boot: int, timeout: float = 60.0) -> dict:
    """Ask the agent to report (``report`` command) until the store holds ``answered`` requests of ``boot``: a
    command published while the agent is not yet subscribed finds no one, so it is asked again."""
    deadline = time.monotonic() + timeout
    for n in range(1_000):
        link.publish(topic(PREFIX, device, Leaf.CMD), encode({"command": "report", "id": f"report-{boot}-{n}"}),
                     qos=1).wait_for_publish(10)
        again = min(deadline, time.monotonic() + 5.0)
        while time.monotonic() < again:
            d = traffic_of(db, device)
            if d is not None and d["answered"] == answered and d["boot"] == boot:
                return d
            time.sleep(0.1)  # a poll interval: the loop waits for the store to show the requests
        if time.monotonic() >= deadline:
            break
    pytest.fail(f"the store never showed {answered} answered requests of boot {boot}: {traffic_of(db, device)}")


def test_requests_through_a_real_agent_show_in_fleet_status_and_metrics(mosquitto, key_dir, tiny_onnx, tmp_path):
    db = tmp_path / "fleet.db"
    ingester = Ingester(mosquitto.config, db, flush_s=0.05)
    worker = threading.Thread(target=ingester.run, daemon=True)
    worker.start()
    link = MqttLink(mosquitto.config, "host-commands", lambda t, p: None).start()
    try:
        wait_subscribed(link, lambda: ingester.received > 0)
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as fleet:
            [device] = fleet.device_ids
            sock = str(fleet.socket_path(device))
            artifact = make_artifact(tiny_onnx, tmp_path / "artifacts", key_dir, version=10)
            [r] = deliver(mosquitto.config, PREFIX, artifact, [device], 60)
            assert r.status == "activated"
            with Client(sock, timeout=30) as client:
                for _ in range(BEFORE):
                    assert client.infer(x).version == 10
                with pytest.raises(InferenceError) as bad:  # a wrong shape: a 400, counted as bad_request
                    client.infer(np.zeros((1, 2), np.float32))
                assert bad.value.status == 400
            first = report_until(link, device, db, BEFORE, boot=1)
            assert first["requests"] == BEFORE + 1 and first["errors"] == {"bad_request": 1}

            agent = fleet.procs[device]  # the agent restarts: its counters start again under boot 2
            agent.terminate()
            agent.wait(30)
            fleet.spawn(device)
            with Client(sock, timeout=60) as client:  # retries while the socket refuses, until the agent is back
                for _ in range(AFTER):
                    assert client.infer(x).version == 10
            report_until(link, device, db, BEFORE + AFTER, boot=2)
    finally:
        link.stop()
        ingester.stop()
        worker.join(15)
    assert not worker.is_alive() and ingester.error is None
    assert sum(ingester.traffic_skipped.values()) == 0  # the agent's own snapshots are stored as sent

    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--db", str(db), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-3000:]
    [d] = [d for d in json.loads(status.stdout)["traffic"]["devices"] if d["device_id"] == device]
    [v10] = [v for v in d["versions"] if v["version"] == 10]
    assert (v10["answered"], v10["requests"], v10["errors"]) == (BEFORE + AFTER, BEFORE + AFTER + 1, {"bad_request": 1})
    assert v10["p50_ms"] is not None and v10["p50_ms"] <= v10["p95_ms"] <= v10["p99_ms"]
    assert d["boot"] == 2 and d["rejected"] == 0
    [row] = [c for c in json.loads(status.stdout)["traffic"]["classes"] if c["version"] == 10]
    assert (row["target"], row["devices"], row["answered"]) == ("rpi4", 1, BEFORE + AFTER)

    from prometheus_client.parser import text_string_to_metric_families

    with Dashboard(db, port=0) as dash:
        with urllib.request.urlopen(dash.url + "metrics", timeout=10) as r:
            text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    labels = (("device", device), ("target", "rpi4"))
    assert samples[("edgefleet_inference_request_duration_seconds_count", labels)] == BEFORE + AFTER
    assert samples[("edgefleet_inference_request_duration_seconds_bucket", (*labels[:1], ("le", "+Inf"),
                                                                             *labels[1:]))] == BEFORE + AFTER
    assert samples[("edgefleet_inference_requests_total", labels)] == BEFORE + AFTER + 1
    assert samples[("edgefleet_inference_errors_total", tuple(sorted((*labels, ("kind", "bad_request")))))] == 1
