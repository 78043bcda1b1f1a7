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
