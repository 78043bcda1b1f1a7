"""The host's one way of waiting on devices (pipeline.ota.watch) on a real Mosquitto: retained messages are
all in once the marker is back, an answer to a command published through the watch is never missed, and a
deadline ends the wait."""

from __future__ import annotations

import time

from device_agent.mqtt import MqttLink
from pipeline.ota.watch import Watch


def test_settle_returns_once_every_retained_message_is_in(mosquitto):
    pub = MqttLink(mosquitto.config, "retainer", lambda t, p: None).start()
    try:
        for i in range(100):
            info = pub.publish(f"edgefleet/v1/d{i}/status", str(i).encode(), qos=1, retain=True)
        info.wait_for_publish(5)
    finally:
        pub.stop()
    got: list[str] = []
    with Watch(mosquitto.config, "edgefleet", [("edgefleet/v1/+/status", 1)], lambda t, p: got.append(t)) as w:
        assert w.settle(10)
        assert sorted(got) == sorted(f"edgefleet/v1/d{i}/status" for i in range(100))
    fresh: list[str] = []
    with Watch(mosquitto.config, "edgefleet", [("edgefleet/v1/+/status", 1)], lambda t, p: fresh.append(t),
               fresh_only=True) as w:
        assert w.settle(10) and fresh == []  # the marker is live; the retained statuses were dropped


def test_an_answer_to_a_command_published_through_the_watch_is_never_missed(mosquitto):
    """A device that answers at once: the watch's subscription is registered before its command is routed."""
    echo: Watch | None = None

    def answer(t: str, p: bytes) -> None:
        assert echo is not None
        echo.publish("edgefleet/v1/dev/events", p, qos=1)

    echo = Watch(mosquitto.config, "edgefleet", [("edgefleet/v1/dev/cmd", 1)], answer, name="echo").start()
    try:
        assert echo.settle(10)  # the device's own subscription is in place
        for i in range(30):  # a fresh watch each time: each one subscribes, publishes at once, and waits
            got: list[bytes] = []
            with Watch(mosquitto.config, "edgefleet", [("edgefleet/v1/dev/events", 1)],
                       lambda t, p: got.append(p)) as w:
                w.publish("edgefleet/v1/dev/cmd", f"n{i}".encode())
                assert w.until(lambda: f"n{i}".encode() in got, 10), i
    finally:
        echo.stop()


def test_until_ends_at_its_deadline(mosquitto):
    with Watch(mosquitto.config, "edgefleet", [("edgefleet/v1/+/events", 1)], lambda t, p: None) as w:
        t0 = time.monotonic()
        assert w.until(lambda: False, 0.5) is False
        assert 0.45 <= time.monotonic() - t0 < 3
