"""Pieces of provisioning that need no SSH: the agent wheel, and the background service script run for real."""

from __future__ import annotations

import os
import subprocess
import time
import zipfile

from pipeline.provision.services import Background, Layout
from pipeline.provision.wheel import agent_version, build_agent_wheel


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
        deadline = time.monotonic() + 10
        while not (root / "runs").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pg = int((root / "agent.pid").read_text().split()[0])
        # the agent dies: the supervisor starts it again
        agent = subprocess.run(["pgrep", "-g", str(pg), "-f", "sleep 300"], capture_output=True, text=True).stdout.split()
        os.kill(int(agent[0]), 9)
        deadline = time.monotonic() + 10
        while (root / "runs").read_text().count("started") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (root / "runs").read_text().count("started") == 2
        assert run("stop") == 0 and run("status") != 0
        assert live_members(pg) == []  # nothing left (zombies aside: this container's init may not reap them)
    finally:
        run("stop")
    # a pid file left from before a reboot, naming some other live process: not ours, never signalled
    (root / "agent.pid").write_text(f"{os.getpid()} 1\n")
    assert run("status") != 0 and run("stop") == 0
    assert os.path.exists(f"/proc/{os.getpid()}")  # still here
