"""Pieces of provisioning that need no SSH: the agent wheel, and the background service script run for real."""

from __future__ import annotations

import os
import subprocess
import time
import zipfile

from pipeline.provision.services import Background, Layout
from pipeline.provision.wheel import agent_version, build_agent_wheel


def until(check, timeout: float, what: str):
    """Poll ``check()`` (a real condition) until it is truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return value


def test_the_agent_wheel_holds_the_agent_alone_and_says_its_build(tmp_path):
    wheel = build_agent_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("device_agent/", "edgefleet_agent-")) for n in names)
    assert "device_agent/_build.py" in names and not any(n.startswith("pipeline/") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert f"Version: {agent_version()}" in meta and "Requires-Dist: onnxruntime" not in meta.split("Provides-Extra")[0]
    assert build_agent_wheel(tmp_path) == wheel  # the same sources: the same wheel, not rebuilt
    assert agent_version("gx1") == agent_version().split("+")[0] + "+gx1"


def live_members(pgid: int) -> list[int]:
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(stat))
    return out


def test_agentctl_supervises_restarts_and_never_trusts_a_stale_pid_file(tmp_path):
    root = tmp_path / "agent"
    fake = root / "current" / "venv" / "bin" / "device-agent"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho started >> \"$(dirname \"$0\")/../../../runs\"\nexec sleep 300\n")
    fake.chmod(0o755)
    [(path, text)] = Background().files(Layout(str(root), str(tmp_path))).items()
    ctl = root / "agentctl"
    assert path == str(ctl)
    ctl.write_text(text)

    def run(action: str) -> int:
        return subprocess.run(["sh", str(ctl), action], timeout=30).returncode

    try:
        assert run("status") != 0 and run("start") == 0 and run("status") == 0
        assert run("start") == 0  # already running: no second supervisor
        pg = int((root / "agent.pid").read_text().split()[0])

        def agent_pids() -> list[str]:  # the fake agent once it has exec'd into its long sleep
            return subprocess.run(["pgrep", "-g", str(pg), "-f", "sleep 300"], capture_output=True,
                                  text=True).stdout.split()

        # the agent dies: the supervisor starts it again
        os.kill(int(until(agent_pids, 10, "the agent running under its supervisor")[0]), 9)
        until(lambda: (root / "runs").read_text().count("started") >= 2, 10, "the supervisor's restart")
        assert (root / "runs").read_text().count("started") == 2
        assert run("stop") == 0 and run("status") != 0
        assert live_members(pg) == []  # nothing left (zombies aside: this container's init may not reap them)
    finally:
        run("stop")
    # a pid file left from before a reboot, naming some other live process: not ours, never signalled
    (root / "agent.pid").write_text(f"{os.getpid()} 1\n")
    assert run("status") != 0 and run("stop") == 0
    assert os.path.exists(f"/proc/{os.getpid()}")  # still here


def test_the_live_view_has_every_retained_message_without_waiting_out_a_timer(mosquitto):
    """``pipeline devices`` reads what the broker retains; it knows it has all of it when its own marker, sent
    after subscribing, comes back: no fixed wait."""
    from device_agent.mqtt import MqttLink
    from device_agent.protocol import Leaf, encode, topic
    from pipeline.cli.provision import live_fleet

    devices = [f"edge-{i}" for i in range(40)]
    pub = MqttLink(mosquitto.config, "retainer", lambda t, p: None).start()
    try:
        for d in devices:
            pub.publish(topic("edgefleet", d, Leaf.ONLINE), b"online", qos=1, retain=True)
            pub.publish(topic("edgefleet", d, Leaf.STATUS), encode({"device_id": d, "state": "idle"}), qos=1,
                        retain=True).wait_for_publish(5)
    finally:
        pub.stop()
    t0 = time.monotonic()
    seen = live_fleet(mosquitto.config, "edgefleet", timeout_s=30)
    took = time.monotonic() - t0
    assert sorted(seen) == sorted(devices)
    assert all(seen[d]["online"] and seen[d]["status"]["state"] == "idle" for d in devices)
    assert took < 10, f"{took:.1f} s: the marker did not come back, the view waited out its timeout"
