"""Telemetry ingest on a real Mosquitto: a crash of the ingester between batches loses nothing, device clocks
an hour off lose nothing, poison messages are counted and skipped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest
from fleet_probe import PROBE, probe_stored, stop_ingester, until, wait_subscribed

from device_agent.mqtt import MqttLink
from device_agent.protocol import Event, Leaf, Metrics, Status, encode, topic
from pipeline.errors import StoreError
from pipeline.fleet import FleetStore
from pipeline.fleet.ingest import Drop, Ingester

pytestmark = pytest.mark.slow


def ingester(mosquitto, db):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fleet", "ingest", "--broker",
                             f"127.0.0.1:{mosquitto.port}", "--db", str(db)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stored(db) -> int:
    if not db.exists():
        return 0
    s = FleetStore(db)
    try:
        return s.count("metrics")
    finally:
        s.close()


def test_a_killed_ingester_loses_no_acknowledged_message(mosquitto, tmp_path):
    db = tmp_path / "fleet.db"
    proc = ingester(mosquitto, db)
    pub = MqttLink(mosquitto.config, "simulated-devices", lambda t, p: None).start()
    sent, t0 = 0, time.time()  # recent: older rows would be rolled up by the ingester's retention
    try:
        wait_subscribed(pub, probe_stored(db))  # its persistent session and subscriptions now exist on the broker
        for i in range(600):
            device = f"sim-{i % 3}"
            m = Metrics(device, 1, 1.0 + i % 7, 2.0, 80.0, 10, True, ts=t0 + i / 1000)
            pub.publish(f"edgefleet/v1/{device}/metrics", encode(m), qos=1).wait_for_publish(5)
            sent += 1
            if i == 300:
                proc.kill()  # kill -9 between (or during) batches
                proc.wait()
    finally:
        pub.stop()
    proc = ingester(mosquitto, db)  # back up: the broker delivers what was queued or never acknowledged
    try:
        until(lambda: stored(db) >= sent, 60, f"{sent} metrics stored (have {stored(db)})", poll_s=0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert stored(db) == sent == 600

    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--db", str(db), "--json"],
                            capture_output=True, text=True, check=True)
    devices = [d for d in json.loads(status.stdout)["devices"] if d["device_id"] != PROBE]
    assert [d["device_id"] for d in devices] == ["sim-0", "sim-1", "sim-2"]
    assert all(d["metrics"]["rss_mb"] == 80.0 and d["active_version"] == 1 for d in devices)


def test_two_ingesters_share_the_fleet_and_a_killed_one_loses_nothing(mosquitto, fleet_db):
    """Two `pipeline fleet ingest` processes in one share group write to one store (SQLite, then PostgreSQL): the
    broker splits the fleet's messages between them; one is killed (-9) mid-run and started again with its client
    id. Every message is stored once, and each device's row is its last status in its own order whichever
    ingester committed last."""
    def ingest(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fleet", "ingest", "--broker",
                                 f"127.0.0.1:{mosquitto.port}", "--db", str(fleet_db), "--group", "pair",
                                 "--client-id", f"ingest-{name}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def count() -> int:
        try:
            s = FleetStore(fleet_db, readonly=True)
        except StoreError:  # not created yet
            return 0
        try:
            return s.count("metrics")
        finally:
            s.close()

    a, b = ingest("a"), ingest("b")  # both open a new store at once: one migrates, the other finds it done
    pub = MqttLink(mosquitto.config, "simulated-devices", lambda t, p: None).start()
    t0, sent = time.time(), 0
    try:
        wait_subscribed(pub, probe_stored(fleet_db))
        for i in range(800):
            device = f"sim-{i % 20}"
            seq = i // 20
            m = Metrics(device, 1, 1.0 + i % 7, 2.0, 80.0, 10, True, ts=t0 + i / 1000, boot=1, seq=2 * seq)
            s = Status(device, "idle", "rpi4", active_version=1, active_slot="A", boot=1, seq=2 * seq + 1)
            infos = [pub.publish(topic("edgefleet", device, Leaf.METRICS), encode(m), qos=1),
                     pub.publish(topic("edgefleet", device, Leaf.STATUS), encode(s), qos=1)]
            for info in infos:
                info.wait_for_publish(5)
            sent += 1
            if i == 400:
                a.kill()  # kill -9 between (or during) batches; a supervisor starts it again, same client id
                a.wait()
                a = ingest("a")
    finally:
        pub.stop()
    try:
        until(lambda: count() >= sent, 90, f"{sent} metrics stored (have {count()})", poll_s=0.2)
    finally:
        outputs = [stop_ingester(p) for p in (a, b)]
    assert count() == sent == 800
    stored_by = [int(m.group(1)) for out in outputs for m in [re.search(r"stored (\d+) row", out)] if m]
    assert len(stored_by) == 2 and all(n > 0 for n in stored_by), outputs  # the group split the messages
    s = FleetStore(fleet_db)
    try:
        devices = {d["device_id"]: d for d in s.devices() if d["device_id"] != PROBE}
    finally:
        s.close()
    assert sorted(devices) == sorted(f"sim-{i}" for i in range(20))
    assert all(d["boot"] == 1 and d["seq"] == 2 * 39 + 1 and d["state"] == "idle" for d in devices.values())


@pytest.fixture
def running(mosquitto, tmp_path):
    """An ingester in a thread, subscribed (probe round-trip), and a link to publish as the devices."""
    ing = Ingester(mosquitto.config, tmp_path / "fleet.db", flush_s=0.05)
    worker = threading.Thread(target=ing.run, daemon=True)
    worker.start()
    pub = MqttLink(mosquitto.config, "devices", lambda t, p: None).start()
    wait_subscribed(pub, lambda: ing.received > 0)
    yield ing, pub
    pub.stop()
    ing.stop()
    worker.join(10)
    assert not worker.is_alive() and ing.error is None


def test_device_clocks_an_hour_off_lose_nothing(running, tmp_path):
    """Each device says online (retained, as the agent does), then three statuses and five metrics and two events
    stamped by its own clock; one clock is an hour behind the host, one an hour ahead, one steps back an hour in
    the middle (NTP), one agent sends no order at all (an older agent): every device ends where it said it is."""
    ing, pub = running
    now = time.time()
    skews = {"behind": -3600.0, "late-5s": -5.0, "ahead": 3600.0, "stepped": 0.0, "unordered": -3600.0}
    expected_rows = 0
    for device, skew in skews.items():
        pub.publish(topic("edgefleet", device, Leaf.ONLINE), b"online", qos=1, retain=True).wait_for_publish(5)
        seq = iter(range(1, 100))

        def order() -> dict:
            return {} if device == "unordered" else {"boot": 7, "seq": next(seq)}

        for i, (state, version) in enumerate((("downloading", 1), ("testing", 1), ("activated", 2))):
            clock = now + skew + i - (3600 if device == "stepped" and i == 2 else 0)
            s = Status(device, state, "rpi4", active_version=version, ts=clock, **order())
            pub.publish(topic("edgefleet", device, Leaf.STATUS), encode(s), qos=1, retain=True).wait_for_publish(5)
            for k in range(2 if i < 2 else 1):
                m = Metrics(device, version, 1.0, 2.0, 80.0, 10, True, ts=clock + k / 10, state=state, **order())
                pub.publish(topic("edgefleet", device, Leaf.METRICS), encode(m), qos=1).wait_for_publish(5)
        for k in range(2):
            e = Event(device, "activated", f"event {k}", ts=now + skew + k, **order())
            pub.publish(topic("edgefleet", device, Leaf.EVENTS), encode(e), qos=1).wait_for_publish(5)
        expected_rows += 3 + 5 + 2
    until(lambda: ing.stored >= expected_rows, 60, f"{expected_rows} rows stored (have {ing.stored})")
    store = FleetStore(tmp_path / "fleet.db")
    try:
        by_id = {d["device_id"]: d for d in store.devices()}
        for device in skews:
            d = by_id[device]
            assert (d["state"], d["active_version"], d["online"]) == ("activated", 2, 1), device
            assert abs(d["last_seen"] - time.time()) < 120, device  # the host's clock, whatever the device's
            assert len(store.series(device)) == 5 and len(store.events(device=device)) == 2, device
    finally:
        store.close()
    assert ing.dropped == 0


def test_poison_messages_are_counted_and_skipped_and_the_ingester_goes_on(running, tmp_path):
    ing, pub = running
    poison = [("metrics", b"[" * 100_000), ("metrics", b'{"v":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}"),
              ("status", b"\xff\xfe"), ("events", b"1e999"), ("metrics", b'{"v": 2}'), ("status", b"[]"),
              ("metrics", b'{"v":1,"ts":' + b"9" * 5000 + b"}"), ("online", b"maybe"),
              ("metrics", b" " * 70_000)]
    for leaf, payload in poison:
        pub.publish(f"edgefleet/v1/dev-1/{leaf}", payload, qos=1).wait_for_publish(5)
    for bad in ("<script>", "a b", "é" * 3, "x" * 70):
        pub.publish(f"edgefleet/v1/{bad}/metrics", encode(Metrics("x", 1, 1.0, 2.0, 80.0, 1, True)),
                    qos=1).wait_for_publish(5)
    good = Metrics("dev-1", 1, 1.0, 2.0, 80.0, 10, True)
    pub.publish(topic("edgefleet", "dev-1", Leaf.METRICS), encode(good), qos=1).wait_for_publish(5)
    until(lambda: ing.stored >= 1, 30, "the good message stored")
    counts = {r.value: n for r, n in ing.dropped_by.items() if n}
    assert counts == {"size": 3, "json": 2, "schema": 4, "device_id": 4}, counts
    assert ing.dropped_by[Drop.INTERNAL] == 0 and ing.error is None
    store = FleetStore(tmp_path / "fleet.db")
    try:
        assert {d["device_id"] for d in store.devices()} == {PROBE, "dev-1"}
    finally:
        store.close()
