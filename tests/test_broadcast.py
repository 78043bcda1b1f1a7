"""Broadcast delivery: one publish per chunk for a wave, repairs per device, on a real Mosquitto and real agents.

A ~1 MB model (32 chunks of 32 KiB) that does not compress, so every chunk is on the wire.
"""

from __future__ import annotations

import threading

import pytest
import yaml
from torch import nn

from conftest import REPO, make_artifact
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import ARTIFACTS_LEVEL, Job, Leaf, artifact_topic, topic
from device_agent.slots import SlotStore
from device_agent.errors import ProtocolError
from pipeline.config import dump_deploy, load_deploy, parse_deploy
from pipeline.export import export_model
from pipeline.ota import LocalFleet, deliver
from pipeline.ota.broadcast import BroadcastMode, broadcasting, use_broadcast
from pipeline.ota.watch import Watch

PREFIX = "edgefleet"


@pytest.fixture(scope="module")
def mb_model(tmp_path_factory):
    import torch

    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    return export_model("onnx", model, (1, 8, 8), tmp_path_factory.mktemp("mb") / "mb.onnx", 17)


def installed(fleet: LocalFleet, device_id: str) -> bytes:
    active = SlotStore(fleet.config_path(device_id).parent / "state").active()
    assert active is not None, f"{device_id} has no active model"
    return active.path.read_bytes()


# ------------------------------------------------------------------------------------------------ fast

def test_fleet_broadcast_setting_round_trips(tmp_path):
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_deploy(path).fleet.broadcast == "auto"
    for mode in ("always", "never"):
        data["fleet"]["broadcast"] = mode
        path.write_text(yaml.safe_dump(data))
        cfg = load_deploy(path)
        assert cfg.fleet.broadcast == mode
        assert parse_deploy(dump_deploy(cfg), cfg.source, cfg.base_dir) == cfg


def test_auto_broadcasts_waves_of_more_than_one_device():
    assert not use_broadcast(None, 1) and use_broadcast(None, 2)
    assert use_broadcast("always", 1) and not use_broadcast("never", 50)
    with broadcasting(BroadcastMode.NEVER):
        assert not use_broadcast(None, 50)
    assert use_broadcast(None, 50)


def test_the_job_names_its_artifact_topic_and_nothing_else():
    env = {"signed": {}, "signatures": []}
    name = artifact_topic(PREFIX, "j1-abc")
    assert name == f"{PREFIX}/v1/{ARTIFACTS_LEVEL}/j1-abc"
    assert Job.parse(Job("j1-abc", env, name).to_bytes()) == Job("j1-abc", env, name)
    assert Job.parse(Job("j1-abc", env).to_bytes()).artifact_topic is None
    for bad in (f"{PREFIX}/v1/{ARTIFACTS_LEVEL}/j2", "#", f"{PREFIX}/+/v1/{ARTIFACTS_LEVEL}/j1-abc", 7):
        with pytest.raises(ProtocolError, match="artifact_topic"):
            Job.parse(Job("j1-abc", env, bad).to_bytes())


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_a_wave_of_four_gets_each_chunk_once_and_one_device_is_served_alone(mosquitto, mb_model, key_dir,
                                                                            tmp_path):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=60)
    assert art.manifest.encoding == "identity" and art.manifest.chunks >= 30
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 4, key_dir / "signing.pub", PREFIX) as fleet:
        got = deliver(mosquitto.config, PREFIX, art, fleet.device_ids, 60)
        assert [r.status for r in got] == ["activated"] * 4, [(r.device_id, r.reason) for r in got]
        assert got.broadcast is not None and got.broadcast.chunks == art.manifest.chunks
        assert got.broadcast.subscribed == 4
        # each chunk once for the wave, plus what repairs cost: far from the 4x of unicast
        assert got.egress_bytes < 1.5 * art.size_bytes, got.summary()
        model = art.model_path.read_bytes()
        for d in fleet.device_ids:
            assert installed(fleet, d) == model

        # one device: unicast, its own stream/data, as before
        one = make_artifact(mb_model, tmp_path / "b", key_dir, version=61)
        [r] = solo = deliver(mosquitto.config, PREFIX, one, fleet.device_ids[:1], 60)
        assert r.status == "activated" and r.active_version == 61
        assert solo.broadcast is None and r.chunks_served == one.manifest.chunks
        assert solo.egress_bytes == r.bytes_sent >= one.size_bytes
        assert installed(fleet, fleet.device_ids[0]) == model


@pytest.mark.slow
def test_a_device_killed_mid_broadcast_and_a_late_one_complete_through_repairs(mosquitto, mb_model, key_dir,
                                                                               tmp_path):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=70)
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 4, key_dir / "signing.pub", PREFIX) as fleet:
        killed, late, *rest = fleet.device_ids
        proc = fleet.procs.pop(late)  # stopped cleanly: its retained online flag says offline
        proc.terminate()
        proc.wait(10)
        others_done = threading.Event()
        activated: set[str] = set()

        cut = threading.Event()

        def progress(state, r):  # on the host's network thread
            if r.device_id == killed and state == "downloading" and not cut.is_set():
                cut.set()
                fleet.procs[killed].kill()  # subscribed, nothing written yet: the broadcast goes by without it
            if state == "activated":
                activated.add(r.device_id)
                if activated >= set(rest):
                    others_done.set()

        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", deliver(mosquitto.config, PREFIX, art,
                                                                        fleet.device_ids, 90, progress)))
        t.start()
        try:
            assert others_done.wait(60), "the two devices left running did not activate"
            fleet.procs[killed].wait(10)
            fleet.spawn(killed)  # its session kept the broadcast's chunks queued; the rest it repairs
            fleet.spawn(late)  # the broadcast is over: it asks for the chunks itself
        finally:
            t.join(90)
        got = out["r"]
        by_id = {r.device_id: r for r in got}
        assert all(r.status == "activated" for r in got), [(r.device_id, r.status, r.reason, fleet.log_tail(r.device_id))
                                                           for r in got]
        assert got.broadcast.chunks == art.manifest.chunks and got.broadcast.subscribed >= 2
        # it subscribed after the broadcast: the retained last chunk told it so at once, the rest it repaired
        assert by_id[late].chunks_served == art.manifest.chunks - 1
        assert all(by_id[d].chunks_served == 0 for d in rest)  # the broadcast brought them everything
        model = art.model_path.read_bytes()
        for d in fleet.device_ids:
            assert installed(fleet, d) == model


# ------------------------------------------------------------------------------------------------ ACL

@pytest.mark.slow
def test_the_acl_lets_devices_read_artifact_topics_and_only_the_host_write_them(tls_broker, tiny_onnx, key_dir,
                                                                              tmp_path):
    _, identity, made = tls_broker
    name = artifact_topic(PREFIX, "j1-acl")
    assert f"pattern read {PREFIX}/v1/{ARTIFACTS_LEVEL}/+" in open(made["acl"]).read()
    got = []
    host = MqttLink(identity("host"), "host-x", lambda t, p: None).start()
    own_job = topic(PREFIX, "dev-b", Leaf.JOB)
    host.publish(own_job, b"marker", qos=1, retain=True).wait_for_publish(5)
    # the broker handles one client's subscriptions in order: once the retained marker on the second one has come
    # back, the artifact topic's subscription (the first) is in place
    reader = Watch(identity("dev-b"), PREFIX, [(name, 1), (own_job, 1)], lambda t, p: got.append(p) if p else None,
                   name="dev-b").start()
    a = MqttLink(identity("dev-a"), "dev-a", lambda t, p: None).start()
    try:
        assert reader.until(lambda: b"marker" in got, 10)
        got.clear()
        host.publish(own_job, b"", qos=1, retain=True).wait_for_publish(5)  # cleared before an agent reads it
        a.publish(name, b"forged by a device", qos=1).wait_for_publish(5)  # refused by the broker's ACL
        host.publish(name, b"from the host", qos=1).wait_for_publish(5)
        assert reader.until(lambda: b"from the host" in got, 10)
        assert got == [b"from the host"]  # in order after the forgery: had it passed, it would be here first
    finally:
        host.stop()
        a.stop()
        reader.stop()

    # and a broadcast delivery under that ACL: both devices subscribe and take every chunk from the broadcast
    agents, threads = [], []
    for d in ("dev-a", "dev-b"):
        cfg = AgentConfig(device_id=d, target="rpi4", state_dir=tmp_path / d, trusted_keys=(key_dir / "signing.pub",),
                          broker=identity(d), benchmark_runs=5)
        agents.append(Agent(cfg))
        threads.append(threading.Thread(target=agents[-1].run, daemon=True))
        threads[-1].start()
    try:
        res = deliver(identity("host"), PREFIX, make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=80),
                      ["dev-a", "dev-b"], 60)
        assert [r.status for r in res] == ["activated", "activated"], [r.reason for r in res]
        assert res.broadcast is not None and res.broadcast.chunks >= 1
        assert all(r.chunks_served == 0 for r in res), res.summary()
    finally:
        for agent in agents:
            agent.stop()
        for t in threads:
            t.join(10)
