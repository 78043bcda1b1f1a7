"""Broadcast delivery: one publish per chunk for a wave, repairs per device, on a real Mosquitto and real agents.

A ~1 MB model (32 chunks of 32 KiB) that does not compress, so every chunk is on the wire.
"""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import yaml
from torch import nn

from conftest import REPO, make_artifact
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import (
    ARTIFACTS_LEVEL, DEFAULT_WINDOW, Job, Leaf, StreamGet, artifact_topic, decode, decode_chunk, encode_chunk, topic,
)
from device_agent.slots import SlotStore
from device_agent.errors import ProtocolError
from pipeline.config import dump_deploy, load_deploy, parse_deploy
from pipeline.export import export_model
from pipeline.ota import LocalFleet, deliver
from pipeline.ota import delivery as delivery_mod
from pipeline.ota.broadcast import PASS_GRACE_S, BroadcastMode, BroadcastResult, broadcasting, use_broadcast
from pipeline.ota.delivery import ChunkServer, DeviceResult
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


class FakeInfo:
    def __init__(self, acked: bool) -> None:
        self.acked = acked

    def is_published(self) -> bool:
        return self.acked

    def wait_for_publish(self, timeout=None) -> bool:
        return self.acked


class FakeLink:
    """Stands in for the host's or an agent's MqttLink: keeps what is published; ``acked`` says whether the broker
    has acknowledged what is published from now on."""

    session_present = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []
        self.subscribes = 0
        self.acked = True

    def publish(self, name, payload, qos=1, retain=False, until_routed=False):
        self.sent.append((name, payload if isinstance(payload, bytes) else payload.encode()))
        return FakeInfo(self.acked)

    def subscribe(self, name, qos=1):  # as MqttLink: once in its list, sent to the broker each time
        self.subscribes += 1
        if name not in self.subscribed:
            self.subscribed.append(name)

    def unsubscribe(self, name):
        self.subscribed.remove(name)

    def chunks(self, name: str) -> list[int]:
        """The chunk indices published on ``name``, in order; clears what was kept."""
        out = [decode_chunk(p)[1] for t, p in self.sent if t == name]
        self.sent.clear()
        return out

    def asked(self, device_id: str) -> list[dict]:
        """The stream/get requests a device published; clears what was kept."""
        out = [decode(p, "stream/get") for t, p in self.sent if t == topic(PREFIX, device_id, Leaf.STREAM_GET)]
        self.sent.clear()
        return out


def test_the_host_leaves_to_the_broadcast_what_a_listener_asks_before_it_passed_and_coalesces_the_rest(
        mb_model, key_dir, tmp_path, monkeypatch):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=90)
    name = artifact_topic(PREFIX, "j1")
    b = BroadcastResult()  # the broadcast is going by
    counters = {d: DeviceResult(d) for d in ("d1", "d2", "d3", "old")}
    link = FakeLink()
    server = ChunkServer(link, PREFIX, art, "j1", counters, broadcast=b, artifact_name=name)
    data = topic(PREFIX, "d1", Leaf.STREAM_DATA)

    # asked after a silence, mid-broadcast, before the last chunk came: all of it is on its way, none is served
    server.serve([("d1", StreamGet("j1", [2, 9, 10], listening=True))])
    assert link.sent == []
    assert (counters["d1"].chunks_deferred, b.chunks_deferred, counters["d1"].chunks_served) == (3, 3, 0)
    # it saw the broadcast's last chunk go by without 9: it missed it, served at once
    server.serve([("d1", StreamGet("j1", [9], listening=True, passed=True))])
    assert link.chunks(data) == [9] and b.chunks_deferred == 3
    # an agent that knows no broadcast (it does not listen) is served alone at once: unicast is the fallback
    server.serve([("old", StreamGet("j1", [0, 1]))])
    assert link.chunks(topic(PREFIX, "old", Leaf.STREAM_DATA)) == [0, 1] and counters["old"].chunks_deferred == 0

    # two devices that saw it pass asking for chunk 4 at once: once on the artifact topic for both; 3 to d2 alone
    server.serve([("d2", StreamGet("j1", [3, 4], listening=True, passed=True)),
                  ("d3", StreamGet("j1", [4], listening=True, passed=True))])
    assert [(t, decode_chunk(p)[1]) for t, p in link.sent] == [(topic(PREFIX, "d2", Leaf.STREAM_DATA), 3), (name, 4)]
    link.sent.clear()
    assert (b.repair_chunks, counters["d2"].chunks_rebroadcast, counters["d3"].chunks_served) == (1, 1, 1)
    assert counters["d3"].bytes_sent == 0 and b.repair_bytes > 0  # the rebroadcast is the broadcast's egress

    # asked again: not sent while the broker has not acknowledged it (still in the host's outgoing queue), sent
    # again once it has (and RESEND_AFTER_S has passed: none here)
    monkeypatch.setattr(delivery_mod, "RESEND_AFTER_S", 0.0)
    link.acked = False
    ask = StreamGet("j1", [5], listening=True, passed=True)
    server.serve([("d1", ask)])
    server.serve([("d1", ask)])
    assert link.chunks(data) == [5] and counters["d1"].chunks_in_flight == 1
    link.acked = True
    server.serve([("d1", StreamGet("j1", [9], listening=True, passed=True))])
    assert link.chunks(data) == [9] and counters["d1"].chunks_resent == 1

    # long after the broadcast's end, a listener that never saw it pass is served what it asks for
    b.finished_at = delivery_mod.time.monotonic() - 2 * PASS_GRACE_S
    server.serve([("d1", StreamGet("j1", [20, 31], listening=True))])
    assert link.chunks(data) == [20, 31]

    # unicast: no broadcast, no deferral, no rebroadcast, whatever the device says
    solo = {"d9": DeviceResult("d9")}
    plain = ChunkServer(link, PREFIX, art, "j1", solo)
    plain.serve([("d9", StreamGet("j1", [0, 30], listening=True))])
    assert link.chunks(topic(PREFIX, "d9", Leaf.STREAM_DATA)) == [0, 30] and solo["d9"].chunks_deferred == 0


def test_a_repair_few_of_many_downloading_devices_want_goes_to_each_not_to_the_whole_wave(mb_model, key_dir,
                                                                                         tmp_path):
    """Every listener receives a rebroadcast and the broker queues one for each: two of ten devices still
    downloading are served alone; six of them asking at once get one publish on the artifact topic."""
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=91)
    name = artifact_topic(PREFIX, "j1")
    b = BroadcastResult(finished_at=delivery_mod.time.monotonic())
    counters = {f"d{i}": DeviceResult(f"d{i}", device_state="downloading") for i in range(10)}
    link = FakeLink()
    server = ChunkServer(link, PREFIX, art, "j1", counters, broadcast=b, artifact_name=name)
    server.serve([(d, StreamGet("j1", [4], listening=True, passed=True)) for d in ("d0", "d1")])
    assert sorted(t for t, _ in link.sent) == [topic(PREFIX, d, Leaf.STREAM_DATA) for d in ("d0", "d1")]
    assert b.repair_chunks == 0
    link.sent.clear()
    server.serve([(f"d{i}", StreamGet("j1", [5], listening=True, passed=True)) for i in range(2, 8)])
    assert [(t, decode_chunk(p)[1]) for t, p in link.sent] == [(name, 5)] and b.repair_chunks == 1
    # once most have finished, the two still downloading are the wave: one publish for both
    for i in range(2, 10):
        counters[f"d{i}"].device_state = "activated"
    link.sent.clear()
    server.serve([(d, StreamGet("j1", [6], listening=True, passed=True)) for d in ("d0", "d1")])
    assert [(t, decode_chunk(p)[1]) for t, p in link.sent] == [(name, 6)] and b.repair_chunks == 2


def _broadcast_agent(tmp_path, key_dir, link: FakeLink) -> Agent:
    cfg = AgentConfig(device_id="dev-1", target="rpi4", trusted_keys=(key_dir / "signing.pub",),
                      state_dir=tmp_path / "state", topic_prefix=PREFIX, benchmark_runs=2)
    agent = Agent(cfg)
    agent.link = link
    return agent


def _frames(art, job_id: str) -> list[bytes]:
    data, size = art.model_path.read_bytes(), art.manifest.chunk_size
    return [encode_chunk(job_id, i, data[i * size:(i + 1) * size]) for i in range(art.manifest.chunks)]


def test_a_listener_that_asked_after_a_silence_listens_again_once_the_broadcast_shows_up(mb_model, key_dir,
                                                                                         tmp_path):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=91)
    link = FakeLink()
    agent = _broadcast_agent(tmp_path, key_dir, link)
    name = artifact_topic(PREFIX, "jb1")
    agent._dispatch(topic(PREFIX, "dev-1", Leaf.JOB), Job("jb1", art.envelope, name).to_bytes())
    assert link.subscribed == [name] and link.asked("dev-1") == []  # listening: nothing asked for
    agent._tick()
    assert link.asked("dev-1") == []  # the first silence has not passed
    agent._transfer.last_progress -= 10 * agent._transfer.quiet_s  # it has now (no broadcast came)
    agent._tick()
    [ask] = link.asked("dev-1")
    assert ask["listening"] is True and "passed" not in ask  # the host leaves it to the broadcast
    assert link.subscribes == 2  # subscribed again: had the broadcast passed, its retained last chunk would come
    frames = _frames(art, "jb1")
    for frame in frames[:-1]:  # the broadcast after all: it listens again, and asks for nothing more
        agent._dispatch(name, frame)
    assert not agent._transfer.repairing and link.asked("dev-1") == []
    agent._dispatch(name, frames[-1])
    assert agent._transfer is None and link.subscribed == []  # complete from the broadcast alone
    assert agent.store.active().version == 91 and link.asked("dev-1") == []


def test_a_device_that_drops_off_mid_broadcast_asks_only_for_what_it_missed(mb_model, key_dir, tmp_path):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=92)
    link = FakeLink()
    agent = _broadcast_agent(tmp_path, key_dir, link)
    name = artifact_topic(PREFIX, "jb2")
    frames = _frames(art, "jb2")
    agent._dispatch(topic(PREFIX, "dev-1", Leaf.JOB), Job("jb2", art.envelope, name).to_bytes())
    for frame in frames[:10]:
        agent._dispatch(name, frame)

    # malformed broadcast frames are refused and counted; nothing changes, nothing is asked of the host but the
    # one damaged chunk (by its own index, once)
    damaged = bytearray(frames[11])
    damaged[-1] ^= 1
    for junk in (b"EFC1", b"not a frame", encode_chunk("jb2", 99, b"x"), encode_chunk("jb2", 12, b"short"),
                 bytes(damaged)):
        agent._dispatch(name, junk)
    assert agent.broadcast_refused == 5
    assert [(a["chunks"], a.get("resend")) for a in link.asked("dev-1")] == [([11], True)]
    assert len(agent._transfer.download.have) == 10

    # it drops off (stopped: its session and what the broker queued for it lost); the broadcast goes on without it
    agent._transfer.download.close()
    link = FakeLink()
    back = _broadcast_agent(tmp_path, key_dir, link)
    back.resume_from_disk()
    assert link.subscribed == [name]
    back._dispatch("", b"connected")  # no session kept: it asks at once, not knowing yet whether it passed
    [first] = link.asked("dev-1")
    assert first["chunks"] == list(range(10, 26)) and "passed" not in first
    back._dispatch(name, frames[-1])  # the retained last chunk: the broadcast has passed; what is missing it missed
    [again] = link.asked("dev-1")
    assert again["passed"] is True and again["chunks"] == list(range(10, 26))
    asked = set(again["chunks"])
    for i in range(10, art.manifest.chunks - 1):  # the host's repairs, on its own stream/data
        back._dispatch(topic(PREFIX, "dev-1", Leaf.STREAM_DATA), frames[i])
        for a in link.asked("dev-1"):
            assert a["passed"] is True
            asked |= set(a["chunks"])
    assert asked == set(range(10, art.manifest.chunks - 1))  # only what it missed, each once
    assert back._transfer is None and back.store.active().version == 92


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


class _Cut:
    """A delivery to ``fleet`` on its own thread, ``hook(state, result)`` called with every status (on the host's
    network thread), and an event once every device of ``others`` has activated."""

    def __init__(self, mosquitto, fleet, art, others, hook) -> None:
        self.others, self.hook = set(others), hook
        self.others_done, self.activated, self.out = threading.Event(), set(), {}
        self.thread = threading.Thread(target=lambda: self.out.setdefault("r", deliver(
            mosquitto.config, PREFIX, art, fleet.device_ids, 90, self._progress)))

    def _progress(self, state, r) -> None:
        self.hook(state, r)
        if state == "activated":
            self.activated.add(r.device_id)
            if self.activated >= self.others:
                self.others_done.set()

    @contextlib.contextmanager
    def running(self):
        """Starts the delivery; once the block is over, waits for its end."""
        self.thread.start()
        try:
            yield self
        finally:
            self.thread.join(90)

    def result(self):
        return self.out["r"]


@pytest.mark.slow
def test_a_device_killed_mid_broadcast_and_a_late_one_complete_through_repairs(mosquitto, mb_model, key_dir,
                                                                               tmp_path):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=70)
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 4, key_dir / "signing.pub", PREFIX) as fleet:
        killed, late, *rest = fleet.device_ids
        proc = fleet.procs.pop(late)  # stopped cleanly: its retained online flag says offline
        proc.terminate()
        proc.wait(10)
        cut = threading.Event()

        def hook(state, r):
            if r.device_id == killed and state == "downloading" and not cut.is_set():
                cut.set()
                fleet.procs[killed].kill()  # subscribed, nothing written yet: the broadcast goes by without it

        with _Cut(mosquitto, fleet, art, rest, hook).running() as run:
            assert run.others_done.wait(60), "the two devices left running did not activate"
            fleet.procs[killed].wait(10)
            fleet.spawn(killed)  # its session kept the broadcast's chunks queued; the rest it repairs
            fleet.spawn(late)  # the broadcast is over: it asks for the chunks itself
        got = run.result()
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


@pytest.mark.slow
def test_a_device_that_drops_off_mid_broadcast_and_loses_its_session_repairs_only_what_it_missed(
        mosquitto, mb_model, key_dir, tmp_path):
    art = make_artifact(mb_model, tmp_path / "a", key_dir, version=75)
    with LocalFleet(tmp_path / "devices", mosquitto.config, "rpi4", 4, key_dir / "signing.pub", PREFIX) as fleet:
        dropper, *rest = fleet.device_ids
        statuses: list[str] = []
        cut = threading.Event()

        def hook(state, r):
            if r.device_id == dropper and state == "downloading" and not cut.is_set():
                statuses.append(state)
                if len(statuses) == 2:  # its second: 16 chunks written, the broadcast still going by
                    cut.set()
                    fleet.procs[dropper].kill()

        with _Cut(mosquitto, fleet, art, rest, hook).running() as run:
            assert run.others_done.wait(60), "the devices left running did not activate"
            fleet.procs[dropper].wait(10)
            [job_dir] = (fleet.config_path(dropper).parent / "state" / "downloads").iterdir()
            had = set(json.loads((job_dir / "have.json").read_text())["have"])
            MqttLink(mosquitto.config, f"agent-{dropper}", lambda *a: None).start().stop()  # its session is gone
            fleet.spawn(dropper)
        got = run.result()
        by_id = {r.device_id: r for r in got}
        assert all(r.status == "activated" for r in got), [(r.device_id, r.status, r.reason) for r in got]
        chunks = art.manifest.chunks
        assert DEFAULT_WINDOW <= len(had) < chunks  # it had said so (progress every 16 chunks), and dropped off
        r = by_id[dropper]
        # served what it had not written when it dropped off (the retained last chunk may have brought that one),
        # each once; the others took everything from the broadcast
        assert chunks - len(had | {chunks - 1}) <= r.chunks_served <= chunks - len(had), (r.chunks_served, len(had))
        assert r.chunks_resent == 0 and all(by_id[d].chunks_served == 0 for d in rest)
        assert got.egress_bytes <= 2 * art.size_bytes, got.summary()
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
