"""Backing off on repeated failure: the agent's own start delay, and the background supervisor's."""

from __future__ import annotations

import re
import subprocess
import time

from device_agent.guard import StartBackoff
from pipeline.provision.services import Background, Layout


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_quick_deaths_grow_the_start_delay_and_a_clean_stop_resets_it(tmp_path):
    clock = Clock()
    backoff = StartBackoff(tmp_path, clock)
    delays = []
    for _ in range(10):  # a crash loop: a start every 2 s, never a clean stop
        delays.append(backoff.record_start())
        clock.t += 2
    assert delays[:3] == [0, 0, 0]  # a crash or two (a power cut, an OOM kill) costs nothing
    assert delays[3:6] == [StartBackoff.BASE_S, 2 * StartBackoff.BASE_S, 4 * StartBackoff.BASE_S]
    assert delays == sorted(delays) and max(delays) <= StartBackoff.MAX_S
    backoff.record_clean_stop()
    assert backoff.record_start() == 0
    clock.t += StartBackoff.WINDOW_S + 1  # old deaths are forgiven
    (tmp_path / "starts.json").write_text("[1, 2, 3, 4, 5]")
    assert backoff.record_start() == 0


def test_a_damaged_record_is_no_reason_to_wait(tmp_path):
    (tmp_path / "starts.json").write_bytes(b"\xff[[[")
    assert StartBackoff(tmp_path).record_start() == 0


def test_the_background_supervisor_doubles_its_delay_when_the_agent_keeps_dying(tmp_path):
    root = tmp_path / "agent"
    fake = root / "current" / "venv" / "bin" / "device-agent"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 1\n")  # dies at once, every time
    fake.chmod(0o755)
    [(path, text)] = Background().files(Layout(str(root), str(tmp_path))).items()
    ctl = root / "agentctl"
    ctl.write_text(text)
    log = root / "agent.log"
    try:
        assert subprocess.run(["sh", str(ctl), "start"], timeout=30).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the supervisor's second announcement
            delays = [int(d) for d in re.findall(r"starting it again in (\d+) s", log.read_text())] \
                if log.exists() else []
            if len(delays) >= 2:
                break
            time.sleep(0.1)
        assert delays[:2] == [3, 6], log.read_text()
    finally:
        subprocess.run(["sh", str(ctl), "stop"], timeout=30)
