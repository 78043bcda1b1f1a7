"""Both local brokers start on free loopback ports; clients negotiate MQTT 5 or fall back to 3.1.1."""

import threading

import pytest

from device_agent.config import BrokerConfig
from device_agent.mqtt import ConnectError, MqttLink


def roundtrip(config: BrokerConfig) -> tuple[str, bytes]:
    got, seen = [], threading.Event()
    pub = MqttLink(config, "pub", lambda t, p: None).start()
    pub.publish("t/v1/dev/status", b"retained-hello", qos=1, retain=True).wait_for_publish(5)
    sub = MqttLink(config, "sub", lambda t, p: (got.append(p), seen.set()), [("t/v1/+/status", 1)]).start()
    try:
        assert seen.wait(5), "retained message not delivered"
        return sub.protocol, got[0]
    finally:
        sub.stop()
        pub.stop()


def test_mosquitto_speaks_mqtt5(mosquitto):
    assert roundtrip(mosquitto.config) == ("5", b"retained-hello")


def test_amqtt_negotiates_down_to_311(amqtt_broker):
    assert roundtrip(amqtt_broker.config) == ("3.1.1", b"retained-hello")


def test_unreachable_broker_is_a_clear_error():
    from pipeline.broker import free_port

    port = free_port()
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port} unreachable"):
        MqttLink(BrokerConfig(port=port), "x", lambda t, p: None).start(timeout=2)


def test_a_persistent_mosquitto_keeps_a_session_and_its_queue_across_a_restart(tmp_path):
    """LocalBroker(persistent=True): a graceful restart keeps an offline persistent session, its subscription and the
    QoS 1 message queued for it; the default broker keeps nothing."""
    from conftest import require

    from pipeline.broker import LocalBroker, mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    got = []
    for persistent in (True, False):
        with LocalBroker("mosquitto", tmp_path / str(persistent), persistent=persistent) as broker:
            sub = MqttLink(broker.config, "keeper", lambda t, p: None, [("t/v1/+/metrics", 1)], persistent=True).start()
            sub.stop()  # offline; the broker holds its session
            pub = MqttLink(broker.config, "pub", lambda t, p: None).start()
            pub.publish("t/v1/dev/metrics", b"queued", qos=1).wait_for_publish(5)
            pub.stop()
            broker.restart()
            seen = threading.Event()
            mine: list[bytes] = []
            sub = MqttLink(broker.config, "keeper", lambda t, p: (mine.append(p), seen.set()), [("t/v1/+/metrics", 1)],
                           persistent=True).start()
            seen.wait(5 if persistent else 1)  # without persistence nothing comes: the shorter wait bounds the test
            sub.stop()
            got.append((sub.session_present, mine))
    assert got == [(True, [b"queued"]), (False, [])]


@pytest.mark.xfail(strict=True, reason="mosquitto 2.0.11 restores a persistent session's plain subscriptions across a "
                   "restart, not its shared ones: what the fleet publishes before the ingesters subscribe again is "
                   "acknowledged 'no matching subscribers' and dropped, so agents publish telemetry again "
                   "(device_agent.mqtt until_routed; bench/soak.py, docs/fleet.md)")
def test_a_persistent_mosquitto_keeps_a_sessions_shared_subscription_across_a_restart(tmp_path):
    from conftest import require

    from pipeline.broker import LocalBroker, mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    with LocalBroker("mosquitto", tmp_path / "b", persistent=True) as broker:
        share = [("$share/g/t/v1/+/metrics", 1)]
        MqttLink(broker.config, "keeper", lambda t, p: None, share, persistent=True).start().stop()
        broker.restart()
        pub = MqttLink(broker.config, "pub", lambda t, p: None).start()
        info = pub.publish("t/v1/dev/metrics", b"after the restart", qos=1)
        info.wait_for_publish(5)
        pub.stop()
        seen = threading.Event()
        sub = MqttLink(broker.config, "keeper", lambda t, p: seen.set(), share, persistent=True).start()
        try:
            assert seen.wait(3), "the message published after the restart never came"
        finally:
            sub.stop()
