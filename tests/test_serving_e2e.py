"""Applications on the device call the model through a real agent process while a real Mosquitto delivers an
update and the host then rolls it back: four client threads calling without pause see no failed request, and
every answer carries the version that gave it, in the order the device switched."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_artifact
from traffic import SteadyTraffic
from device_agent.client import Client
from pipeline.ota import LocalFleet, deliver
from pipeline.ota.commands import roll_back
from pipeline.ota.status import DeviceStatus

pytestmark = pytest.mark.slow

PREFIX = "edgefleet"


def test_a_deploy_and_a_rollback_under_steady_traffic_fail_no_request(mosquitto, key_dir, tiny_onnx, tmp_path):
    from pipeline.export import export_model

    torch.manual_seed(7)
    other = export_model("onnx", nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), (1, 8, 8),
                         tmp_path / "other.onnx", 17)
    arts = tmp_path / "artifacts"
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as fleet:
        [device] = fleet.device_ids
        sock = str(fleet.socket_path(device))
        [r] = deliver(mosquitto.config, PREFIX, make_artifact(tiny_onnx, arts, key_dir, version=10), [device], 30)
        assert r.status == "activated"
        with Client(sock) as c:
            described = c.model()
        assert described["version"] == 10 and described["inputs"][0]["shape"][1:] == [1, 8, 8]

        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        with SteadyTraffic(sock, x) as traffic:
            traffic.wait_for(100)
            [r] = deliver(mosquitto.config, PREFIX, make_artifact(other, arts, key_dir, version=11), [device], 60)
            assert r.status == "activated"
            traffic.wait_for(traffic.answers + 100)
            [back] = roll_back(mosquitto.config, PREFIX, [device], 30)
            assert back.status == DeviceStatus.ROLLED_BACK and back.active_version == 10, back
            traffic.wait_for(traffic.answers + 100)
        failures, seen = traffic.failures, traffic.seen
        assert failures == []
        for versions in seen:  # 10 until the switch, 11 until the rollback, 10 after: never out of order
            phases = [v for k, v in enumerate(versions) if k == 0 or versions[k - 1] != v]
            assert phases == [10, 11, 10], phases
        assert {v for s in seen for v in s} == {10, 11} and seen[0][-1] == 10


def test_the_agent_serves_while_the_broker_is_down_and_reports_the_traffic_when_it_is_back(tmp_path, key_dir,
                                                                                           tiny_onnx):
    """The broker goes away and the agent restarts: it cannot connect, and still answers its applications; when
    the broker is back on its address, the agent connects and its metrics carry every request it answered."""
    import json

    from device_agent.config import BrokerConfig
    from device_agent.mqtt import MqttLink
    from device_agent.protocol import Leaf, topic
    from pipeline.broker import LocalBroker, mosquitto_binary

    from conftest import require

    require(mosquitto_binary() is not None, "mosquitto")
    broker = LocalBroker("mosquitto", tmp_path / "broker").start()
    port = broker.port
    fleet = LocalFleet(tmp_path / "devices", broker.config, "rpi4", 1, key_dir / "signing.pub", PREFIX,
                       metrics_interval_s=0.5)
    try:
        fleet.start()
        [device] = fleet.device_ids
        [r] = deliver(broker.config, PREFIX, make_artifact(tiny_onnx, tmp_path / "arts", key_dir, version=20),
                      [device], 30)
        assert r.status == "activated"
        broker.stop()
        fleet.procs[device].terminate()
        fleet.procs[device].wait(10)
        fleet.spawn(device)  # a restart while the broker is unreachable
        x = np.zeros((1, 1, 8, 8), np.float32)
        with Client(str(fleet.socket_path(device)), timeout=30) as client:
            answered = [client.infer(x).version for _ in range(30)]
        assert answered == [20] * 30 and fleet.procs[device].poll() is None  # serving, not exiting
        seen = threading.Event()
        counts: list[int] = []

        def on_metrics(name, payload):
            body = json.loads(payload)
            traffic = (body.get("traffic") or {}).get("versions", {}).get("20")
            if traffic:
                counts.append(traffic["count"])
                if traffic["count"] >= 30:
                    seen.set()
        broker = LocalBroker("mosquitto", tmp_path / "broker").start(port=port)
        watcher = MqttLink(BrokerConfig(host="127.0.0.1", port=port), "traffic-watch", on_metrics,
                           [(topic(PREFIX, device, Leaf.METRICS), 1)]).start()
        try:
            assert seen.wait(60), counts  # the agent reconnected by itself and reported what it had answered
        finally:
            watcher.stop()
        assert counts[-1] == 30
    finally:
        fleet.stop()
        broker.stop()
