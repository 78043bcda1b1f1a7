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
        stop, failures, seen = threading.Event(), [], [[] for _ in range(4)]
        answered = threading.Condition()

        def traffic(i):
            with Client(sock, timeout=30) as client:
                while not stop.is_set():
                    try:
                        version = client.infer(x).version
                    except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                        failures.append(repr(exc))
                        version = None
                    with answered:
                        if version is not None:
                            seen[i].append(version)
                        answered.notify_all()

        def answers_reach(n):
            with answered:
                assert answered.wait_for(lambda: sum(map(len, seen)) >= n or failures, timeout=60)

        threads = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            answers_reach(100)
            [r] = deliver(mosquitto.config, PREFIX, make_artifact(other, arts, key_dir, version=11), [device], 60)
            assert r.status == "activated"
            answers_reach(sum(map(len, seen)) + 100)
            [back] = roll_back(mosquitto.config, PREFIX, [device], 30)
            assert back.status == DeviceStatus.ROLLED_BACK and back.active_version == 10, back
            answers_reach(sum(map(len, seen)) + 100)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        for versions in seen:  # 10 until the switch, 11 until the rollback, 10 after: never out of order
            phases = [v for k, v in enumerate(versions) if k == 0 or versions[k - 1] != v]
            assert phases == [10, 11, 10], phases
        assert {v for s in seen for v in s} == {10, 11} and seen[0][-1] == 10
