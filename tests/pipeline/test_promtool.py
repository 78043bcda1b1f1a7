"""/metrics as Prometheus' own linter reads it: ``promtool check metrics`` on what a live dashboard serves, with
its ingester running against a real Mosquitto and having dropped junk (so every family has samples)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest
from conftest import require
from fleet_probe import until, wait_subscribed

from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, Metrics, Status, encode, topic
from device_agent.drift import DriftScores
from device_agent.quality import LiveAccuracy, ShadowStats
from device_agent.serving import BUCKETS_MS, TrafficStats
from pipeline.dashboard import Dashboard
from pipeline.fleet import FleetStore
from pipeline.fleet.ingest import Ingester

pytestmark = pytest.mark.slow


def test_metrics_pass_promtool_check(mosquitto, tmp_path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (apt-get install prometheus)")
    db = tmp_path / "fleet.db"
    store = FleetStore(db)
    store.record(name="m", target="rpi4", version=3, sha256="0" * 64, artifact="a", kind="deploy",
                 status="succeeded", reason=None, results=[{"device_id": "dev-1", "status": "activated"}])
    store.close()
    ingester = Ingester(mosquitto.config, db, flush_s=0.05)
    with Dashboard(db, port=0, ingester=ingester) as dash:
        pub = MqttLink(mosquitto.config, "devices", lambda t, p: None).start()
        try:
            wait_subscribed(pub, lambda: ingester.received > 0)
            now = time.time()
            traffic = TrafficStats()  # what the device's inference API counted: a histogram for promtool to read
            for ms in (0.2, 3.0, 3.0, 7000.0):
                traffic.observe(3, ms)
            traffic.error(3, "deadline")
            # how good the model is on that traffic: drift scores, live accuracy, a candidate shadowed beside it
            drift = DriftScores(500, 500, 500, 0, psi_outputs=0.4, psi_confidence=0.05, mean_shift=(0.1, 0.3),
                                max_mean_shift=0.3)
            accuracy = LiveAccuracy()
            for i, label in enumerate((1, 1, 0)):
                accuracy.answered(f"r{i}", 3, 1)
                accuracy.feedback(f"r{i}", label)
            shadow = ShadowStats(4, 3, 0.1, offered=12, compared=10, dropped=2, agree=9, sum_distance=1.0,
                                 max_distance=0.5, active_ms=[0] * 3 + [10] + [0] * (len(BUCKETS_MS) - 3),
                                 candidate_ms=[0] * 5 + [10] + [0] * (len(BUCKETS_MS) - 5))
            for device in ("dev-1", "dev-2"):
                messages = [(Leaf.ONLINE, b"online"),
                            (Leaf.STATUS, encode(Status(device, "downloading", "rpi4", active_version=3, job_id="j4",
                                                        version=4, progress=0.5, boot=1, seq=1))),
                            (Leaf.METRICS, encode(Metrics(device, 3, 3.0, 4.0, 80.0, 10, True, 4.5, 250.0, 2, 35.0,
                                                          51.5, 1.9, "predicted", "a", 60.0, ts=now, boot=1,
                                                          seq=2, traffic=traffic.snapshot(),
                                                          drift={"version": 3, **drift.to_dict()},
                                                          accuracy=accuracy.snapshot(), shadow=shadow.to_dict())))]
                for leaf, payload in messages:
                    pub.publish(topic("edgefleet", device, leaf), payload, qos=1).wait_for_publish(5)
            pub.publish("edgefleet/v1/dev-1/metrics", b"[" * 100_000, qos=1).wait_for_publish(5)
            pub.publish("edgefleet/v1/<bad>/metrics", b"{}", qos=1).wait_for_publish(5)
            until(lambda: ingester.stored >= 4 and ingester.dropped >= 2, 30, "telemetry stored and junk dropped")
        finally:
            pub.stop()
        with urllib.request.urlopen(dash.url + "metrics", timeout=10) as r:
            body = r.read()
        with urllib.request.urlopen(dash.url + "healthz", timeout=10) as r:
            assert r.status == 200
    text = body.decode()
    assert 'edgefleet_ingest_dropped_messages_total{reason="size"} 1.0' in text
    assert 'edgefleet_ingest_dropped_messages_total{reason="device_id"} 1.0' in text
    assert 'edgefleet_inference_latency_seconds{device="dev-2",percentile="95"} 0.004' in text
    assert 'edgefleet_inference_request_duration_seconds_bucket{device="dev-2",le="0.005",target="rpi4"} 3.0' in text
    assert 'edgefleet_inference_request_duration_seconds_bucket{device="dev-2",le="+Inf",target="rpi4"} 4.0' in text
    assert 'edgefleet_inference_request_duration_seconds_count{device="dev-2",target="rpi4"} 4.0' in text
    assert 'edgefleet_inference_requests_total{device="dev-2",target="rpi4"} 5.0' in text
    assert 'edgefleet_inference_errors_total{device="dev-2",kind="deadline",target="rpi4"} 1.0' in text
    assert 'edgefleet_drift_psi{device="dev-2",score="outputs",target="rpi4",version="3"} 0.4' in text
    assert 'edgefleet_drift_mean_shift_max{device="dev-2",target="rpi4",version="3"} 0.3' in text
    assert 'edgefleet_drift_drifting{device="dev-2",target="rpi4",version="3"} 1.0' in text
    assert 'edgefleet_live_labelled_total{device="dev-2",version="3"} 3.0' in text
    assert 'edgefleet_live_correct_total{device="dev-2",version="3"} 2.0' in text
    assert 'edgefleet_shadow_compared_total{candidate="4",device="dev-2"} 10.0' in text
    assert 'edgefleet_shadow_agree_total{candidate="4",device="dev-2"} 9.0' in text
    assert 'edgefleet_ingest_quality_skipped_total{reason="drift"} 0.0' in text
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
        (checked.stdout + checked.stderr).decode()
