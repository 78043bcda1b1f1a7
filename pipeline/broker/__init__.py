"""The MQTT broker: a local one as a child process (``local``, with the amqtt fallback in ``embedded``), the user's
own (``external_broker``), and the configuration of a TLS fleet broker with per-device ACLs (``config``, on the
certificates of ``pki``)."""

from .local import BROKERS, LocalBroker, external_broker, free_port, mosquitto_binary

__all__ = ["BROKERS", "LocalBroker", "external_broker", "free_port", "mosquitto_binary"]
