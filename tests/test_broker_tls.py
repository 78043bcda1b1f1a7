"""`pipeline broker config` on a real Mosquitto: TLS with client certificates, and per-device ACLs."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from conftest import make_artifact
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.mqtt import ConnectError, MqttLink
from pipeline.ota import deliver
from pipeline.ota.watch import Watch

pytestmark = pytest.mark.slow


def test_a_client_without_a_certificate_is_refused(tls_broker, tmp_path):
    base, identity, made = tls_broker
    with pytest.raises(ConnectError):
        MqttLink(base, "anonymous", lambda t, p: None).start(timeout=3)
    no_cert = dataclasses.replace(base, ca_file=made["ca"], cert_file=None, key_file=None)
    with pytest.raises(ConnectError):
        MqttLink(dataclasses.replace(no_cert), "cert-less", lambda t, p: None).start(timeout=3)
    acl = (tmp_path / "b" / "acl").read_text()
    assert "pattern write edgefleet/v1/%u/status" in acl and "user host" in acl


def test_a_device_publishes_only_on_its_own_topics(tls_broker):
    _, identity, _ = tls_broker
    got = []
    host = Watch(identity("host"), "edgefleet", [("edgefleet/v1/+/status", 1), ("edgefleet/v1/+/job", 1)],
                 lambda t, p: got.append((t, p))).start()
    assert host.settle(10)  # the host's subscriptions are in place
    a = MqttLink(identity("dev-a"), "dev-a", lambda t, p: None).start()
    try:
        a.publish("edgefleet/v1/dev-b/status", b"forged", qos=1)  # another device's topic: dropped
        a.publish("edgefleet/v1/dev-a/job", b"self-made job", qos=1)  # only the host publishes jobs
        # the legitimate message last: the broker handles one client's messages in order, so had either
        # forgery got through, the host would have received it before this one
        a.publish("edgefleet/v1/dev-a/status", b"mine", qos=1)
        assert host.until(lambda: (("edgefleet/v1/dev-a/status", b"mine") in got), 10)
        assert got == [("edgefleet/v1/dev-a/status", b"mine")]
    finally:
        a.stop()
        host.stop()


def test_delivery_over_tls(tls_broker, tiny_onnx, key_dir, tmp_path):
    _, identity, _ = tls_broker
    cfg = AgentConfig(device_id="dev-a", target="rpi4", state_dir=tmp_path / "state",
                      trusted_keys=(key_dir / "signing.pub",), broker=identity("dev-a"), benchmark_runs=5)
    agent = Agent(cfg)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        [r] = deliver(identity("host"), "edgefleet", make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=50),
                      ["dev-a"], 60)
        assert r.status == "activated" and r.active_version == 50
    finally:
        agent.stop()
        t.join(10)


def test_a_device_publishes_its_calibration_timings_and_only_the_host_reads_them(tls_broker):
    """The ACL `pipeline broker config` writes lets a device publish on its own calibration leaf (never another
    device's) and the host read every device's; a device reads none."""
    _, identity, made = tls_broker
    from pathlib import Path

    assert "pattern write edgefleet/v1/%u/calibration" in Path(made["acl"]).read_text()
    got, seen_by_b = [], []
    host = Watch(identity("host"), "edgefleet", [("edgefleet/v1/+/calibration", 1)],
                 lambda t, p: got.append((t, p))).start()
    b = Watch(identity("dev-b"), "edgefleet", [("edgefleet/v1/+/calibration", 1)],
              lambda t, p: seen_by_b.append(t), name="dev-b")
    a = MqttLink(identity("dev-a"), "dev-a", lambda t, p: None).start()
    try:
        assert host.settle(10)
        b.start()
        a.publish("edgefleet/v1/dev-b/calibration", b"forged", qos=1)
        a.publish("edgefleet/v1/dev-a/calibration", b"timings", qos=1)  # last: in order after the forgery
        assert host.until(lambda: ("edgefleet/v1/dev-a/calibration", b"timings") in got, 10)
        assert got == [("edgefleet/v1/dev-a/calibration", b"timings")]
        assert seen_by_b == []
    finally:
        a.stop()
        b.stop()
        host.stop()
