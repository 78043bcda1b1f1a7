"""A bounded fuzz over MQTT against a real agent process: 10,000 generated messages on every host -> device
topic, from an attacker who knows the protocol and a trusted keyid but not the private key.

Afterwards the agent is the same process, runs the same model, has not grown, has written nothing outside its
state directory, and a legitimate deploy still goes through."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import psutil
import pytest

from attacker import Attacker, Valid
from conftest import make_artifact
from device_agent.manifest import keyid, load_public_key
from device_agent.mqtt import MqttLink
from device_agent.protocol import encode, encode_chunk, topic, Leaf
from pipeline.ota import LocalFleet, deliver

pytestmark = pytest.mark.slow

PREFIX = "edgefleet"
MESSAGES = 10_000
SEED = int(os.environ.get("EDGEFLEET_FUZZ_SEED", "20261201"))


def snapshot(root, skip) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*"))
            if p.is_file() and skip not in p.parents and p.name != "agent.log"}


def test_ten_thousand_generated_messages_change_nothing(mosquitto, key_dir, tiny_onnx, tmp_path):
    with LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", PREFIX) as fleet:
        device = fleet.device_ids[0]
        v1 = make_artifact(tiny_onnx, tmp_path / "a1", key_dir, version=1)
        [r] = deliver(mosquitto.config, PREFIX, v1, [device], 30)
        assert r.status == "activated"
        proc = psutil.Process(fleet.procs[device].pid)
        state_dir = fleet.config_path(device).parent / "state"
        active_before = json.loads((state_dir / "active.json").read_text())
        rss_before = proc.memory_info().rss
        files_before = snapshot(tmp_path / "dev", state_dir)  # the agents' tree, its cwd included

        data, size = v1.model_path.read_bytes(), v1.manifest.chunk_size
        job_id = "j1-fuzz"
        valid = Valid({"v": 1, "job_id": job_id, "manifest": v1.envelope},
                      [encode_chunk(job_id, i, data[i * size:(i + 1) * size]) for i in range(v1.manifest.chunks)],
                      keyid(load_public_key(key_dir / "signing.pub")))
        attacker = Attacker(SEED, valid, signer=None, big=False)
        extras = [("cmd", json.dumps({"v": 1, "command": "x" * (1 << 20)}).encode()),  # a 1 MB command name
                  ("job", b"[" * 100_000), ("stream/data", b"EFC1" + b"\xff" * 4 + b"{" * 50_000),
                  ("job", b" " * (17 << 20))]  # past any message's size limit: never parsed
        answers: list[dict] = []
        done = threading.Event()

        def on_answer(name: str, payload: bytes) -> None:
            body = json.loads(payload)
            answers.append(body)
            if body.get("kind") == "reported" and body.get("job_id") == "fuzz-end":
                done.set()

        t = lambda leaf: topic(PREFIX, device, leaf)  # noqa: E731
        link = MqttLink(mosquitto.config, f"attacker-{uuid.uuid4().hex[:6]}", on_answer,
                        [(t(Leaf.EVENTS), 1)]).start()
        started = time.monotonic()
        try:
            sent = 0
            for i, (leaf, payload) in enumerate([*extras, *attacker.messages(MESSAGES)]):
                retain = leaf == "job" and i % 7 == 0  # a retained junk job comes back at every reconnect
                link.publish(f"{PREFIX}/v1/{device}/{leaf}", payload, qos=i % 2, retain=retain)
                sent += 1
            # MQTT keeps one publisher's QoS 1 messages in order: when this is answered, everything before it
            # has been handled
            link.publish(t(Leaf.CMD), encode({"command": "report", "id": "fuzz-end"}), qos=1)
            assert done.wait(240), f"the agent stopped answering; log: {fleet.log_tail(device)}"
        finally:
            link.publish(t(Leaf.JOB), b"", qos=1, retain=True).wait_for_publish(5)  # clear the retained junk
            link.stop()
        wall = time.monotonic() - started
        print(f"\nfuzz: {sent} messages (seed {SEED}) in {wall:.1f} s, {len(answers)} events back")

        assert sent >= MESSAGES
        assert fleet.procs[device].poll() is None and proc.is_running(), fleet.log_tail(device)
        assert psutil.Process(fleet.procs[device].pid).pid == proc.pid  # the same process: it never restarted
        assert json.loads((state_dir / "active.json").read_text()) == active_before
        rss_after = proc.memory_info().rss
        assert rss_after < rss_before + 64 * 2**20, f"RSS grew {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB"
        assert snapshot(tmp_path / "dev", state_dir) == files_before, "the agent wrote outside its state directory"
        assert len(answers) < 200, f"{len(answers)} events for {sent} junk messages: not rate-limited"
        assert max(len(json.dumps(a)) for a in answers) < 4096, "an event echoes untrusted input in full"

        v2 = make_artifact(tiny_onnx, tmp_path / "a2", key_dir, version=2)
        [r] = deliver(mosquitto.config, PREFIX, v2, [device], 60)
        assert r.status == "activated" and r.active_version == 2, r.reason
        assert fleet.procs[device].pid == proc.pid
