"""A thin, thread-safe wrapper over paho-mqtt shared by the agent and the host.

It negotiates the protocol (MQTT 5 where the broker offers it, else 3.1.1), re-subscribes after
every reconnect, reconnects with bounded exponential backoff, and hands messages to one callback.

A message published ``until_routed`` (the agent's telemetry) that the broker acknowledges with MQTT 5's "no
matching subscribers" has reached nobody: a broker that restarted restores its clients' sessions but not always
their shared subscriptions (Mosquitto 2.0), so until the ingesters are back it takes the fleet's metrics and drops
them. Such a message is published again, with backoff, until a subscriber takes it or it is too old; the link
keeps at most ``MAX_UNROUTED`` of them (the oldest go first) and counts what it retried and gave up. Only "no
subscriber at all" is seen: while any plain subscription matches (a deployment's watch of the devices' metrics),
the broker routes the message there and says so, and an ingester whose shared subscription it forgot still misses
it; ingesters subscribe again on every connection, which closes that gap once they are back.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from .config import BrokerConfig
from .errors import AgentError

log = logging.getLogger(__name__)

_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


#: MQTT 5 PUBACK reason code: the broker took the message, but no subscription matched it
NO_MATCHING_SUBSCRIBERS = 16
#: unrouted messages kept for another try, and for how long; the retries back off from ~1 s to ~30 s
MAX_UNROUTED = 256
UNROUTED_MAX_AGE_S = 600.0
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 30.0


def _queue_lock(client: mqtt.Client) -> Any:
    """The lock paho's own ``publish`` holds while it queues a packet; what every other call that queues one from
    outside the network thread (an acknowledgement, a subscription, a disconnect) holds here too."""
    return getattr(client, "_out_message_mutex", None) or contextlib.nullcontext()


def _serialise_reconnect(client: mqtt.Client) -> None:
    """paho-mqtt 2's ``reconnect`` (its network thread's, after a lost connection) walks the outgoing packet queue
    while another thread may append to it (a publish, an acknowledgement, a subscription): "deque mutated during
    iteration" ends the network thread, and the link would never connect again (seen with 1,000 agents on two
    cores). Its reconnect here holds ``_queue_lock``, as every call that queues from another thread does, so they
    take turns; such a call meanwhile waits for the connection attempt (a refused one returns at once, an unreachable
    broker within paho's connect timeout)."""
    mutex = getattr(client, "_out_message_mutex", None)
    if mutex is None:  # another paho: nothing known to guard
        return
    reconnect = client.reconnect

    def serialised() -> mqtt.MQTTErrorCode:
        with mutex:
            return reconnect()

    client.reconnect = serialised  # type: ignore[method-assign]


class ConnectError(AgentError):
    """The broker could not be reached or refused the connection."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttLink:
    """``persistent``: the broker keeps this client's subscriptions and queues its QoS 1 messages while it
    is away (clean_session false / MQTT 5 session expiry). ``manual_ack``: ``on_message`` receives a third
    argument, a callable that acknowledges the message; until it is called the broker redelivers it on
    the next connection, so a message is only let go once it has been durably handled."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        on_message: Callable[..., None],
        subscriptions: list[tuple[str, int]] | None = None,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        persistent: bool = False,
        manual_ack: bool = False,
        session_expiry_s: int = 7 * 24 * 3600,
        fresh_only: bool = False,
        reconnect_min_s: float = 1.0,
    ) -> None:
        """``fresh_only``: drop retained messages (the broker's memory of the past), deliver only live ones."""
        self.broker = broker
        self.client_id = client_id
        self.persistent, self.manual_ack, self.session_expiry_s = persistent, manual_ack, session_expiry_s
        self.fresh_only = fresh_only
        #: the first wait before reconnecting (doubling to 30 s while the broker stays away)
        self.reconnect_min_s = reconnect_min_s
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self.subscriptions = list(subscriptions or [])
        self.will = will
        self.protocol: str | None = None
        self.connected = threading.Event()
        #: the broker still held this client's session at the last connection (persistent links only)
        self.session_present = False
        self._client: mqtt.Client | None = None
        self._refused: str | None = None
        self._answered = threading.Event()
        #: until_routed messages in flight (mid -> topic, payload, qos, tries, first published) and those waiting
        #: for another try (a heap by when); both under _routing
        self._routing = threading.Condition(threading.RLock())
        self._in_flight: dict[int, tuple[str, bytes | str, int, int, float]] = {}
        self._retries: list[tuple[float, int, tuple[str, bytes | str, int, int, float]]] = []
        self._order = itertools.count()
        self._retrier: threading.Thread | None = None
        #: until_routed messages the broker routed to nobody: published again, and given up (too old or too many)
        self.unrouted = {"retried": 0, "dropped": 0}

    # -- connection ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "MqttLink":
        order = ["5", "3.1.1"] if self.broker.protocol == "auto" else [self.broker.protocol]
        last = ""
        for proto in order:
            self._refused = None
            self._answered.clear()
            client = self._make_client(proto)
            try:
                if proto == "5":
                    from paho.mqtt.packettypes import PacketTypes
                    from paho.mqtt.properties import Properties

                    props = Properties(PacketTypes.CONNECT)
                    if self.persistent:
                        props.SessionExpiryInterval = self.session_expiry_s
                    client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive,
                                   clean_start=not self.persistent, properties=props)
                else:
                    client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive)
            except ssl.SSLError as exc:
                raise ConnectError(f"MQTT broker {self.broker.host}:{self.broker.port}: TLS handshake failed "
                                   f"({exc.reason or exc}); check ca_file, cert_file and key_file") from None
            except OSError as exc:
                raise ConnectError(
                    f"MQTT broker {self.broker.host}:{self.broker.port} unreachable ({exc.strerror or exc}); "
                    "is it running, and is the address in the config right?"
                ) from None
            client.loop_start()
            if not self._answered.wait(timeout):
                client.loop_stop()
                raise ConnectError(f"MQTT broker {self.broker.host}:{self.broker.port}: no CONNACK in {timeout:g} s")
            if self._refused is None:
                self._client, self.protocol = client, proto
                return self
            client.loop_stop()
            client.disconnect()
            last = self._refused
            if "protocol" not in last.lower():
                break
        raise ConnectError(f"MQTT broker {self.broker.host}:{self.broker.port} refused {self.client_id}: {last}")

    def _make_client(self, proto: str) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=_PROTOCOLS[proto],
                             clean_session=(not self.persistent) if proto == "3.1.1" else None,
                             manual_ack=self.manual_ack)
        if self.broker.ca_file is not None:
            b = self.broker
            client.tls_set(ca_certs=str(b.ca_file), certfile=str(b.cert_file) if b.cert_file else None,
                           keyfile=str(b.key_file) if b.key_file else None)
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=self.reconnect_min_s, max_delay=30)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        _serialise_reconnect(client)
        return client

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._answered.set()
            return
        self.session_present = bool(self.persistent and flags.session_present)
        for topic, qos in self.subscriptions:  # also on a kept session: subscribing again brings retained jobs
            client.subscribe(topic, qos)
        self.connected.set()
        self._answered.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("%s: disconnected from broker (%s); reconnecting", self.client_id, reason_code)

    def _handle_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            if self.fresh_only and message.retain:
                if self.manual_ack:
                    client.ack(message.mid, message.qos)  # the network thread's own: no other thread's reconnect
                return
            if self.manual_ack:
                mid, qos = message.mid, message.qos
                self._on_message(message.topic, message.payload, lambda: self._ack(client, mid, qos))
            else:
                self._on_message(message.topic, message.payload)
        except Exception:  # a bad message must never kill the network thread
            log.exception("%s: handler failed for a message on %s", self.client_id, message.topic)

    @staticmethod
    def _ack(client: mqtt.Client, mid: int, qos: int) -> None:
        with _queue_lock(client):  # from the worker's thread (see _serialise_reconnect)
            client.ack(mid, qos)

    # -- use ----------------------------------------------------------------------------------
    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (when connected) and after every reconnect. The SUBSCRIBE goes out on the connection ahead
        of anything published after this call, so a broker has registered it before it routes those."""
        if (topic, qos) not in self.subscriptions:
            self.subscriptions.append((topic, qos))
        client = self._client
        if client is not None:
            with _queue_lock(client):
                client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription made with :meth:`subscribe` (a persistent session would keep it otherwise)."""
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != topic]
        client = self._client
        if client is not None:
            with _queue_lock(client):
                client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                until_routed: bool = False) -> mqtt.MQTTMessageInfo:
        """``until_routed`` (QoS 1, not retained): publish again while the broker says no subscriber took it (see
        the module's note)."""
        if self._client is None:
            raise ConnectError(f"{self.client_id}: publish on {topic} before start()")
        if not until_routed or qos == 0 or retain:
            with _queue_lock(self._client):  # paho takes it itself only for QoS > 0
                return self._client.publish(topic, payload, qos=qos, retain=retain)
        return self._publish_tracked((topic, payload, qos, 0, time.monotonic()))

    def _publish_tracked(self, item: tuple[str, bytes | str, int, int, float]) -> mqtt.MQTTMessageInfo:
        """Publish and record the mid before its PUBACK can be handled: paho calls ``on_publish`` holding its
        outgoing-message lock, which is held here across the publish (always taken before ``_routing``, never
        after it: no deadlock)."""
        client = self._client
        if client is None:
            raise ConnectError(f"{self.client_id}: publish on {item[0]} after stop()")
        with getattr(client, "_out_message_mutex", None) or contextlib.nullcontext():
            info = client.publish(item[0], item[1], qos=item[2])
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # queued: paho sends it (again)
                with self._routing:
                    self._in_flight[info.mid] = item
        return info

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._routing:
            item = self._in_flight.pop(mid, None)
            if item is None or getattr(reason_code, "value", 0) != NO_MATCHING_SUBSCRIBERS:
                return
            topic, payload, qos, tries, first = item
            if time.monotonic() - first > UNROUTED_MAX_AGE_S:
                self.unrouted["dropped"] += 1
                return
            delay = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** tries) * random.uniform(0.75, 1.25)
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._order),
                                           (topic, payload, qos, tries + 1, first)))
            if len(self._retries) > MAX_UNROUTED:  # the oldest first message goes
                oldest = min(range(len(self._retries)), key=lambda i: self._retries[i][2][4])
                self._retries.pop(oldest)
                heapq.heapify(self._retries)
                self.unrouted["dropped"] += 1
            if self._retrier is None:
                self._retrier = threading.Thread(target=self._retry, name=f"mqtt-retry-{self.client_id}",
                                                 daemon=True)
                self._retrier.start()
            self._routing.notify()

    def _retry(self) -> None:
        """Publish unrouted messages again as they fall due (outside ``_routing``: see ``_publish_tracked``);
        ends with the link."""
        while True:
            with self._routing:
                while True:
                    if self._client is None:
                        return
                    if self._retries and self._retries[0][0] <= time.monotonic():
                        _, _, item = heapq.heappop(self._retries)
                        if time.monotonic() - item[4] > UNROUTED_MAX_AGE_S:
                            self.unrouted["dropped"] += 1
                            continue
                        self.unrouted["retried"] += 1
                        break
                    self._routing.wait(self._retries[0][0] - time.monotonic() if self._retries else None)
            try:
                info = self._publish_tracked(item)
            except ConnectError:
                return
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # paho would not take it
                with self._routing:
                    self.unrouted["dropped"] += 1

    def stop(self) -> None:
        if self._client is not None:
            with _queue_lock(self._client):
                self._client.disconnect()
            self._client.loop_stop()
            with self._routing:  # what waited for another try goes with the link; a new start() starts afresh
                self._client = None
                self.unrouted["dropped"] += len(self._retries)
                self._in_flight.clear()
                self._retries.clear()
                self._retrier = None
                self._routing.notify_all()
