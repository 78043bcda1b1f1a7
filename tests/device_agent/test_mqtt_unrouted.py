"""Telemetry the broker routed to nobody (MQTT 5 PUBACK "no matching subscribers") is published again until a
subscriber takes it, on a real Mosquitto: what a broker restart that forgot the ingesters' shared subscriptions
would otherwise lose."""

from __future__ import annotations

import threading

from fleet_probe import until

from device_agent import mqtt as link_module
from device_agent.mqtt import MqttLink


def test_a_message_nobody_took_is_published_again_until_someone_does(mosquitto, monkeypatch):
    monkeypatch.setattr(link_module, "_RETRY_FIRST_S", 0.05)  # the backoff's start, for a test's pace
    got: list[bytes] = []
    lock = threading.Lock()

    def take(topic, payload):
        with lock:
            got.append(payload)

    device = MqttLink(mosquitto.config, "dev-1", lambda t, p: None).start()
    try:
        assert device.protocol == "5"
        info = device.publish("edgefleet/v1/dev-1/metrics", b"m1", qos=1, until_routed=True)
        info.wait_for_publish(5)
        until(lambda: device.unrouted["retried"] >= 2, 10, "the unrouted message published again")
        ingester = MqttLink(mosquitto.config, "ingest-a", take, [("$share/ingest/edgefleet/v1/+/metrics", 1)])
        ingester.start()
        try:
            until(lambda: got, 15, "the message taken once a subscriber is there")
            retried = device.unrouted["retried"]
            plain = device.publish("edgefleet/v1/dev-1/metrics", b"m2", qos=1, until_routed=True)
            plain.wait_for_publish(5)
            until(lambda: len(got) == 2, 10, "a routed message taken")
            assert got == [b"m1", b"m2"]  # each once: a routed message is not published again
            assert device.unrouted["retried"] == retried and device.unrouted["dropped"] == 0
        finally:
            ingester.stop()
    finally:
        device.stop()


def test_untracked_and_retained_messages_are_never_published_again(mosquitto):
    device = MqttLink(mosquitto.config, "dev-2", lambda t, p: None).start()
    try:
        for until_routed, retain in ((False, False), (True, True)):
            device.publish("edgefleet/v1/dev-2/events", b"e", qos=1, retain=retain,
                           until_routed=until_routed).wait_for_publish(5)
        done = device.publish("edgefleet/v1/dev-2/x", b"", qos=1)  # PUBACKs come in order: the two above are in
        done.wait_for_publish(5)
        assert device.unrouted == {"retried": 0, "dropped": 0} and device._retries == []
    finally:
        device.stop()


def test_the_oldest_unrouted_messages_go_first_past_the_bound(mosquitto, monkeypatch):
    monkeypatch.setattr(link_module, "MAX_UNROUTED", 5)
    monkeypatch.setattr(link_module, "_RETRY_FIRST_S", 30.0)  # none falls due during the test
    device = MqttLink(mosquitto.config, "dev-3", lambda t, p: None).start()
    try:
        for i in range(8):
            device.publish("edgefleet/v1/dev-3/metrics", str(i).encode(), qos=1, until_routed=True).wait_for_publish(5)
        until(lambda: device.unrouted["dropped"] == 3, 10, "three given up")
        assert sorted(item[1] for _, _, item in device._retries) == [b"3", b"4", b"5", b"6", b"7"]
    finally:
        device.stop()


def test_a_reconnect_waits_for_a_publish_in_progress_and_the_link_comes_back(mosquitto):
    """paho's reconnect walks its outgoing queue unguarded, while a publish on another thread appends to it; the
    link makes the two take turns (a reconnect holds the lock a publish holds)."""
    device = MqttLink(mosquitto.config, "dev-4", lambda t, p: None).start()
    try:
        client = device._client
        done = threading.Event()
        with client._out_message_mutex:  # a publish in progress on this thread
            t = threading.Thread(target=lambda: (client.reconnect(), done.set()), daemon=True)
            t.start()
            assert not done.wait(0.3)  # the reconnect waits (a bounded wait for an event that must not come)
        assert done.wait(10)
        until(lambda: device.connected.is_set(), 10, "the link connected again")
        device.publish("edgefleet/v1/dev-4/x", b"after", qos=1).wait_for_publish(5)
    finally:
        device.stop()
