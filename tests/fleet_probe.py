"""Waiting for an ingester to be subscribed, by an observable round-trip instead of a sleep.

A broker drops what nobody subscribes to, so messages published before an ingester's subscriptions exist are
lost, and how long that takes depends on the machine's load. A probe is published (QoS 1, not retained) until the
ingester shows it took one; from then on its subscriptions, and with a persistent session its queue, exist.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.protocol import Leaf, topic

PROBE = "probe-device"


def until(condition: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.05) -> None:
    """Until ``condition()`` holds; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll_s)


def wait_subscribed(publisher, seen: Callable[[], bool], prefix: str = "edgefleet", timeout: float = 60.0) -> None:
    """Publish an ``online`` probe for ``PROBE`` through ``publisher`` (a started MqttLink) until ``seen()``."""
    deadline = time.monotonic() + timeout
    while True:
        publisher.publish(topic(prefix, PROBE, Leaf.ONLINE), b"online", qos=1).wait_for_publish(10)
        again = min(deadline, time.monotonic() + 1.0)  # then publish another: this one may have found no one
        while time.monotonic() < again:
            if seen():
                return
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            pytest.fail(f"the ingester never took a probe message in {timeout:g} s: not subscribed")


def probe_stored(db: Path | str) -> Callable[[], bool]:
    """``seen`` for an ingester in another process: the probe device has a row in its store (a SQLite file or a
    postgresql:// URL)."""
    from pipeline.fleet.sql import ERRORS, SQLITE, Connection, engine_of

    def seen() -> bool:
        if engine_of(db) == SQLITE and not Path(db).exists():
            return False
        try:
            con = Connection(db, readonly=True, timeout_s=5)
            try:
                return con.execute("SELECT 1 FROM devices WHERE device_id = ?", (PROBE,)).fetchone() is not None
            finally:
                con.close()
        except ERRORS:  # not created or migrated yet
            return False

    return seen


def stop_ingester(proc: subprocess.Popen) -> str:
    """SIGTERM a ``pipeline fleet ingest`` process (it flushes and says what it did), kill it if it will not stop;
    its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]
