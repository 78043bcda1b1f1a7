"""A real agent process shadows a candidate on a real Mosquitto while an application calls it: the candidate is
installed and compared on live requests, the active model keeps answering every request; the host then drops
one candidate (the agent keeps its model) and promotes another (activated from its slot, no second download),
and the metrics carry the shadow's figures, live accuracy and drift."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_artifact
from traffic import SteadyTraffic
from device_agent.client import Client
from device_agent.drift import Reference
from device_agent.manifest import Manifest, sign_envelope
from device_agent.protocol import Event, Leaf, Metrics, encode, parse_topic, topic
from device_agent.quality import ShadowStats
from device_agent.serving import BUCKETS_MS
from pipeline.bundle import load_or_create
from pipeline.ota import LocalFleet, deliver
from pipeline.ota.status import DeviceStatus
from pipeline.ota.watch import Watch

pytestmark = pytest.mark.slow

PREFIX = "edgefleet"


def as_shadow(art, key_dir, sample=1.0, max_cpu=1.0):
    """The same artifact, its manifest signed again with a ``shadow`` leaf (what a shadow stage sends)."""
    signed = {**art.envelope["signed"], "shadow": {"sample": sample, "max_cpu": max_cpu}}
    return dataclasses.replace(art, envelope=sign_envelope(signed, load_or_create(key_dir)),
                               manifest=Manifest.from_signed(signed))


class Device:
    """What one device publishes: its metrics and events, collected by a host-side Watch."""

    def __init__(self, broker, device):
        self.metrics: list[Metrics] = []
        self.events: list[Event] = []
        self.device = device
        self.watch = Watch(broker, PREFIX, [(topic(PREFIX, device, Leaf.METRICS), 1),
                                            (topic(PREFIX, device, Leaf.EVENTS), 1)], self._handle)

    def _handle(self, name, payload):
        _, leaf = parse_topic(PREFIX, name)
        (self.metrics if leaf is Leaf.METRICS else self.events).append(
            (Metrics if leaf is Leaf.METRICS else Event).parse(payload))

    def __enter__(self):
        self.watch.start()
        return self

    def __exit__(self, *exc):
        self.watch.stop()

    def command(self, body):
        self.watch.publish(topic(PREFIX, self.device, Leaf.CMD), encode(body))

    def report_until(self, condition, timeout=60.0):
        """Ask for metrics until a report satisfies ``condition``."""
        for n in range(int(timeout)):
            self.command({"command": "report", "id": f"rep{n}"})
            if self.watch.until(lambda: any(condition(m) for m in self.metrics), 1.0):
                return next(m for m in self.metrics if condition(m))
        pytest.fail(f"no report met the condition in {timeout:g} s; last: {self.metrics[-1:]}")


def test_a_candidate_is_shadowed_on_live_requests_then_dropped_or_promoted(mosquitto, key_dir, tiny_onnx, tmp_path):
    from pipeline.export import export_model

    torch.manual_seed(11)
    other = export_model("onnx", nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), (1, 8, 8),
                         tmp_path / "other.onnx", 17)
    arts = tmp_path / "artifacts"
    ref = Reference(100, 1, (0.5,), (0.29,), window=100)  # the application's images: uniform pixels
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as fleet:
        [device] = fleet.device_ids
        sock = str(fleet.socket_path(device))
        [r] = deliver(mosquitto.config, PREFIX, make_artifact(tiny_onnx, arts, key_dir, version=10, reference=ref),
                      [device], 30)
        assert r.status == "activated"
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        with Device(mosquitto.config, device) as dev, SteadyTraffic(sock, x, clients=2) as traffic:
            # 1. a candidate that disagrees: shadowed, never serving, then dropped
            bad = as_shadow(make_artifact(other, arts, key_dir, version=11), key_dir)
            [r] = deliver(mosquitto.config, PREFIX, bad, [device], 30)
            assert r.status == DeviceStatus.SHADOWING and r.active_version == 10, r
            m = dev.report_until(lambda m: (m.shadow or {}).get("compared", 0) >= 30)
            s = ShadowStats.from_dict(m.shadow, len(BUCKETS_MS) + 1)
            assert s.candidate == 11 and s.active == 10 and s.agreement < 0.9, s
            assert s.bench["candidate_p95_ms"] > 0 and s.bench["active_p95_ms"] > 0  # both timed alike at install
            assert m.version == 10 and m.drift["version"] == 10 and m.drift["requests"] > 0
            dev.command({"command": "drop_shadow", "id": "drop1"})
            assert dev.watch.until(lambda: any(e.kind == "shadow_dropped" and e.job_id == "drop1"
                                               for e in dev.events), 30)
            # 2. a candidate that agrees (the same model): shadowed, then promoted by the normal job
            good_art = make_artifact(tiny_onnx, arts, key_dir, version=12)
            [r] = deliver(mosquitto.config, PREFIX, as_shadow(good_art, key_dir), [device], 30)
            assert r.status == DeviceStatus.SHADOWING
            m = dev.report_until(lambda m: (m.shadow or {}).get("candidate") == 12
                                 and m.shadow["compared"] >= 30)
            assert ShadowStats.from_dict(m.shadow, len(BUCKETS_MS) + 1).agreement == 1.0
            [r] = deliver(mosquitto.config, PREFIX, good_art, [device], 30)
            assert r.status == DeviceStatus.ACTIVATED and r.active_version == 12, r
            assert r.chunks_served == 0  # activated from the slot it was shadowed in
            assert any(e["kind"] == "promoting" for e in r.events)
            traffic.wait_for(traffic.answers + 50)
            answer = Client(sock).infer(x)
            assert answer.version == 12
            # live accuracy: the application says what the last answer should have been
            with Client(sock) as c:
                status, _, body = c._request("POST", "/v1/feedback",
                                             json.dumps({"id": answer.id, "label": 3}).encode(),
                                             {"Content-Type": "application/json"})
            assert status == 200 and json.loads(body)["matched"]
            m = dev.report_until(lambda m: m.accuracy is not None and "12" in m.accuracy["versions"])
            assert m.accuracy["versions"]["12"]["labelled"] == 1 and m.shadow is None
        assert traffic.failures == []
        versions = {v for s in traffic.seen for v in s}
        assert versions == {10, 12}  # the dropped candidate never answered a request


def test_a_restarted_agent_shadows_its_candidate_again_and_says_so(mosquitto, key_dir, tiny_onnx, tmp_path):
    from device_agent.protocol import Status

    arts = tmp_path / "artifacts"
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as fleet:
        [device] = fleet.device_ids
        [r] = deliver(mosquitto.config, PREFIX, make_artifact(tiny_onnx, arts, key_dir, version=10), [device], 30)
        assert r.status == "activated"
        [r] = deliver(mosquitto.config, PREFIX, as_shadow(make_artifact(tiny_onnx, arts, key_dir, version=11),
                                                          key_dir), [device], 30)
        assert r.status == DeviceStatus.SHADOWING
        statuses: list[Status] = []
        with Device(mosquitto.config, device) as dev:
            status_watch = Watch(mosquitto.config, PREFIX, [(topic(PREFIX, device, Leaf.STATUS), 1)],
                                 lambda name, payload: statuses.append(Status.parse(payload)), fresh_only=True)
            with status_watch:
                fleet.procs[device].terminate()
                fleet.procs[device].wait(10)
                fleet.procs[device] = fleet.spawn(device)
                assert status_watch.until(lambda: any(s.boot and s.boot > 1 for s in statuses), 30)
            after = [s for s in statuses if s.boot and s.boot > 1]
            assert {s.state for s in after} == {"shadowing"} and after[-1].version == 11, after
            x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
            with SteadyTraffic(str(fleet.socket_path(device)), x, clients=1) as traffic:
                m = dev.report_until(lambda m: (m.shadow or {}).get("compared", 0) >= 5)
            assert traffic.failures == [] and m.shadow["candidate"] == 11 and m.version == 10
