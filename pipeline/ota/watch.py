"""Subscribe, collect what arrives, wait until a condition holds or a deadline passes: how the host waits on
devices, never by sleeping.

Two orderings make this exact rather than hopeful:

* the subscriptions are sent on the connection, before :meth:`Watch.start` returns, ahead of anything
  later published through :meth:`Watch.publish`; a broker handles one client's packets in order, so the
  subscriptions are in place before a command is routed, and the device's answer cannot be missed;
* :meth:`Watch.settle` publishes a marker on a topic of the watch's own and waits for it to come back: the
  broker sends a subscription's retained messages as it registers it, so once the marker (published after
  every subscription) arrives, every retained message already has.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from device_agent.config import BrokerConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)

#: the topic level under ``<prefix>/v1/`` of a watch's markers: not a device id (those start with a letter or
#: digit), matched by no device's or ingester's subscription, readable and writable by the host's identity
SYNC_LEVEL = "_sync"


class Watch:
    """``handle(topic, payload)`` runs on the network thread, one message at a time, under the watch's lock;
    :meth:`until` re-checks its condition after each one. ``fresh_only`` drops retained messages (the
    broker's memory of earlier answers). Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, broker: BrokerConfig, prefix: str, subscriptions: list[tuple[str, int]],
                 handle: Callable[[str, bytes], None], *, name: str = "host-watch", fresh_only: bool = False) -> None:
        self.client_id = f"{name}-{uuid.uuid4().hex[:10]}"
        self._marker_topic = f"{prefix}/v{PROTOCOL_VERSION}/{SYNC_LEVEL}/{self.client_id}"
        self._marker = uuid.uuid4().hex.encode()
        self._marked = False
        self._handle = handle
        self._changed = threading.Condition()
        # the marker's subscription last: it is registered after every other one
        self.link = MqttLink(broker, self.client_id, self._on_message,
                             [*subscriptions, (self._marker_topic, 1)], fresh_only=fresh_only)

    def _on_message(self, name: str, payload: bytes) -> None:
        with self._changed:
            if name == self._marker_topic:
                self._marked = self._marked or payload == self._marker
            else:
                self._handle(name, payload)
            self._changed.notify_all()

    def start(self) -> "Watch":
        self.link.start()
        return self

    def stop(self) -> None:
        self.link.stop()

    def __enter__(self) -> "Watch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.link.publish(topic, payload, qos=qos, retain=retain)

    def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` (checked under the lock, after each message) is true; False at the
        deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def settle(self, timeout: float) -> bool:
        """Wait until every retained message of the subscriptions has arrived (see the module's note). False
        when the marker did not come back in time (a broker whose ACL forbids it): what arrived is all there
        is to go on."""
        self.publish(self._marker_topic, self._marker, qos=1)
        if self.until(lambda: self._marked, timeout):
            return True
        log.warning("%s: the broker did not return the watch's marker on %s within %g s; going on with what "
                    "arrived", self.client_id, self._marker_topic, timeout)
        return False
