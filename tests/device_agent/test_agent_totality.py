"""The agent's handling of any incoming message is total: in-process, through the same dispatch the network
thread feeds, with a link that records what the agent would publish (a protocol unit test: the end-to-end
version over a real broker is tests/test_agent_fuzz.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_artifact
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.manifest import keyid, load_public_key, sign_envelope
from device_agent.protocol import encode_chunk, topic, Leaf

from attacker import Attacker, Valid


class RecordingLink:
    """Stands in for MqttLink: keeps what the agent publishes."""

    session_present = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, name, payload, qos=1, retain=False, until_routed=False):
        self.sent.append((name, payload if isinstance(payload, bytes) else payload.encode(), retain))

        class _Info:
            def wait_for_publish(self, timeout=None):
                return True

        return _Info()


def valid_messages(artifact, job_id, key_dir) -> Valid:
    data = artifact.model_path.read_bytes()
    size = artifact.manifest.chunk_size
    chunks = [encode_chunk(job_id, i, data[i * size:(i + 1) * size]) for i in range(artifact.manifest.chunks)]
    return Valid({"v": 1, "job_id": job_id, "manifest": artifact.envelope}, chunks,
                 keyid(load_public_key(key_dir / "signing.pub")))


@pytest.fixture
def agent_setup(tmp_path, key_dir, tiny_onnx):
    """An agent with v1 active, a valid v2 job and its chunks (and v1's: replays of the active version)."""
    from pipeline.bundle import load_or_create

    cfg = AgentConfig(device_id="dev-1", target="rpi4", trusted_keys=(key_dir / "signing.pub",),
                      state_dir=tmp_path / "state", benchmark_runs=2)
    v1 = make_artifact(tiny_onnx, tmp_path / "a1", key_dir, version=1)
    agent = Agent(cfg)
    agent.link = RecordingLink()
    _deliver_in_process(agent, cfg, v1, "j1")
    assert agent.store.active().version == 1
    v2 = make_artifact(tiny_onnx, tmp_path / "a2", key_dir, version=2)
    key = load_or_create(key_dir)
    agent.replays = valid_messages(v1, "j1", key_dir)
    return agent, cfg, valid_messages(v2, "j2", key_dir), (lambda signed: sign_envelope(signed, key)), v2


def _deliver_in_process(agent, cfg, artifact, job_id):
    t = lambda leaf: topic(cfg.topic_prefix, cfg.device_id, leaf)  # noqa: E731
    agent._dispatch(t(Leaf.JOB), json.dumps({"v": 1, "job_id": job_id, "manifest": artifact.envelope}).encode())
    data = artifact.model_path.read_bytes()
    size = artifact.manifest.chunk_size
    for i in range(artifact.manifest.chunks):
        agent._dispatch(t(Leaf.STREAM_DATA), encode_chunk(job_id, i, data[i * size:(i + 1) * size]))


def _what(status: bytes) -> dict:
    """What a status says about the device (not when, nor the last job's result code)."""
    body = json.loads(status)
    return {k: body.get(k) for k in ("state", "active_version", "active_slot", "job_id", "version", "reason")}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_attack(agent, cfg, valid, signer, n, seed):
    crashes = []
    for leaf, payload in Attacker(seed, valid, signer).messages(n):
        name = f"{cfg.topic_prefix}/v1/{cfg.device_id}/{leaf}"
        try:
            agent.handle(name, payload)
        except Exception as exc:  # noqa: BLE001 - what escapes is exactly what this test counts
            crashes.append((leaf, type(exc).__name__, payload[:120]))
    return crashes


def test_no_generated_message_escapes_dispatch(agent_setup):
    agent, cfg, valid, signer, _ = agent_setup
    crashes = run_attack(agent, cfg, valid, signer, 1500, seed=11)
    assert crashes == [], f"{len(crashes)} messages escaped the agent's dispatch, e.g. {crashes[:5]}"
    assert agent.store.verify_active() is not None  # whatever was signed and activated is complete and verified


def test_unauthenticated_junk_changes_no_persisted_state(agent_setup):
    """Without the private key: forged, mutated and replayed jobs, junk chunks and commands."""
    agent, cfg, _, _, _ = agent_setup
    state_before = (cfg.state_dir / "state.json").read_bytes()
    status_before = _what(next(p for n, p, retain in reversed(agent.link.sent) if n.endswith("/status")))
    agent.link.sent.clear()
    crashes = run_attack(agent, cfg, agent.replays, None, 1500, seed=12)
    assert crashes == []
    assert (cfg.state_dir / "state.json").read_bytes() == state_before
    changed = [p for n, p, retain in agent.link.sent if retain and _what(p) != status_before]
    assert changed == [], f"junk changed the retained status: {changed[:3]}"  # a `report` may repeat it
    events = [json.loads(p) for n, p, _ in agent.link.sent if n.endswith("/events")]
    assert events, "refusals are reported"
    assert len(events) <= 40, f"{len(events)} events for 1,500 junk messages: not rate-limited"
    assert all(len(json.dumps(e)) <= 2048 for e in events), "an event echoes untrusted input in full"


def test_a_one_megabyte_command_name_is_not_echoed(agent_setup):
    agent, cfg, *_ = agent_setup
    agent.link.sent.clear()
    agent._dispatch(topic(cfg.topic_prefix, cfg.device_id, Leaf.CMD),
                    json.dumps({"v": 1, "command": "c" * (1 << 20)}).encode())
    assert agent.link.sent, "an unknown command is reported"
    assert max(len(p) for _, p, _ in agent.link.sent) < 4096


def test_a_legitimate_update_still_goes_through_after_the_attack(agent_setup, tmp_path, key_dir, tiny_onnx):
    agent, cfg, valid, signer, _ = agent_setup
    assert run_attack(agent, cfg, valid, signer, 600, seed=13) == []
    v9 = make_artifact(tiny_onnx, tmp_path / "a9", key_dir, version=9)
    _deliver_in_process(agent, cfg, v9, "j9")
    assert agent.store.active().version == 9


def test_a_message_that_killed_the_agent_twice_is_dropped_after_a_restart(agent_setup):
    """The poison guard: a message in flight when the agent died is recognised after the restart; at the second
    death it is dropped (acknowledged, with an event) instead of crashing the agent again."""
    agent, cfg, valid, _, _ = agent_setup
    name = topic(cfg.topic_prefix, cfg.device_id, Leaf.CMD)
    payload = json.dumps({"v": 1, "command": "report", "id": "poison-1"}).encode()
    for death in (1, 2):
        agent.guard.before(name, payload)  # ... and the process dies here, handling it
        agent = Agent(cfg)
        agent.link = RecordingLink()
        assert agent.guard.deaths(name, payload) == death
    assert agent.handle(name, payload) is False  # dropped, not handled
    kinds = [json.loads(p)["kind"] for n, p, _ in agent.link.sent if n.endswith("/events")]
    assert "poison_dropped" in kinds
    other = json.dumps({"v": 1, "command": "report", "id": "fine"}).encode()
    assert agent.handle(name, other) is True  # only that message


def test_a_crash_once_is_retried(agent_setup):
    """A single death while handling (a power cut mid-activation) is not poison: the message is handled again."""
    agent, cfg, *_ = agent_setup
    name = topic(cfg.topic_prefix, cfg.device_id, Leaf.CMD)
    payload = json.dumps({"v": 1, "command": "report"}).encode()
    agent.guard.before(name, payload)
    agent = Agent(cfg)
    agent.link = RecordingLink()
    assert agent.handle(name, payload) is True


def test_state_dir_holds_everything_the_agent_writes(agent_setup, tmp_path):
    agent, cfg, valid, signer, _ = agent_setup
    outside = {p for p in tmp_path.rglob("*") if cfg.state_dir not in p.parents and p != cfg.state_dir}
    run_attack(agent, cfg, valid, signer, 300, seed=14)
    after = {p for p in tmp_path.rglob("*") if cfg.state_dir not in p.parents and p != cfg.state_dir}
    assert after == outside
    shutil.rmtree(cfg.state_dir / "downloads", ignore_errors=True)


def test_an_agent_stopped_while_its_broker_is_down_stops_cleanly(mosquitto, key_dir, tmp_path):
    """Its offline flag cannot go out (the broker publishes its will instead): the stop still ends the run and
    the MQTT link, instead of raising from the last publish and leaving paho's thread behind."""
    import threading

    from fleet_probe import until

    cfg = AgentConfig(device_id="dev-1", target="rpi4", trusted_keys=(key_dir / "signing.pub",),
                      state_dir=tmp_path / "state", broker=mosquitto.config)
    agent = Agent(cfg)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except BaseException as exc:  # noqa: BLE001 - what the test looks for
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert agent.link.connected.wait(20), "the agent never connected"
        mosquitto.stop()
        until(lambda: not agent.link.connected.is_set(), 20, "the agent to see its broker go")
    finally:
        agent.stop()
        t.join(20)
    assert not t.is_alive() and failed == []
    assert agent.link._client is None  # the link was stopped: no paho thread left
