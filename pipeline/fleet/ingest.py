"""``pipeline fleet ingest``: metrics, statuses and events from the fleet into the store.

Subscribes with a shared subscription (``$share/<group>/...``) so several ingesters split a large fleet,
keeps a persistent session, and acknowledges each QoS 1 message only after the batch holding it was
committed: a crash between batches loses nothing the broker was told we had.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from device_agent.config import BrokerConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import PROTOCOL_VERSION, Leaf, ProtocolError, decode, parse_topic

from .retention import RetentionPolicy, apply_retention
from .store import FleetStore

log = logging.getLogger(__name__)
LEAVES = (Leaf.METRICS, Leaf.STATUS, Leaf.EVENTS, Leaf.ONLINE)


class Ingester:
    def __init__(self, broker: BrokerConfig, db: Path, prefix: str = "edgefleet", group: str = "ingest",
                 shared: bool = True, batch: int = 500, flush_s: float = 0.5, client_id: str | None = None,
                 retention: RetentionPolicy | None = None, retention_every_s: float = 3600) -> None:
        self.db, self.prefix, self.batch, self.flush_s = db, prefix, batch, flush_s
        self.retention, self.retention_every_s = retention, retention_every_s
        share = f"$share/{group}/" if shared else ""
        subs = [(f"{share}{prefix}/v{PROTOCOL_VERSION}/+/{leaf.value}", 1) for leaf in LEAVES]
        self._inbox: queue.Queue[tuple[str, bytes, Callable[[], None]]] = queue.Queue()
        self.link = MqttLink(broker, client_id or f"ingest-{group}", lambda t, p, ack: self._inbox.put((t, p, ack)),
                             subs, persistent=True, manual_ack=True)
        self.stored = 0  # rows written
        self.received = 0  # messages taken from the broker
        self.dropped = 0  # messages that were not protocol messages, or that the store refused
        self.error: str | None = None  # why run() stopped, when it failed
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _commit(self, store: FleetStore, pending: list[tuple[str, str, dict]]) -> None:
        """One transaction for the batch; if the database refuses it, message by message, dropping (and
        counting) only those it refuses: one bad message never stops the fleet's telemetry."""
        try:
            self.stored += store.ingest(pending)
        except sqlite3.Error as batch_error:
            log.warning("batch of %d refused (%s); storing message by message", len(pending), batch_error)
            for message in pending:
                try:
                    self.stored += store.ingest([message])
                except sqlite3.Error as exc:
                    self.dropped += 1
                    log.warning("dropped a message from %s (%s): %s", message[0], message[1], exc)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        try:
            self._run(until)
        except Exception as exc:  # the dashboard shows it (healthz, /metrics) instead of a silent dead thread
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("ingester stopped: %s", self.error)
            raise

    def _run(self, until: Callable[[], bool] | None) -> None:
        self.link.start()
        store = FleetStore(self.db)
        pending: list[tuple[str, str, dict]] = []
        acks: list[Callable[[], None]] = []
        last = time.monotonic()
        retained = float("-inf")
        try:
            while not self._stop.is_set() and not (until and until()):
                if self.retention and time.monotonic() - retained >= self.retention_every_s:
                    retained = time.monotonic()
                    log.info("retention: %s", apply_retention(store, self.retention))
                try:
                    name, payload, ack = self._inbox.get(timeout=0.1)
                    acks.append(ack)
                    self.received += 1
                    try:
                        device, leaf = parse_topic(self.prefix, name)
                        body = {"online": payload == b"online"} if leaf is Leaf.ONLINE else decode(payload, leaf.value)
                        pending.append((device, leaf.value, body))
                    except ProtocolError as exc:
                        self.dropped += 1
                        log.warning("dropped a bad message on %s: %s", name, exc)
                except queue.Empty:
                    pass
                if acks and (len(acks) >= self.batch or time.monotonic() - last >= self.flush_s):
                    self._commit(store, pending)  # committed ...
                    for a in acks:  # ... and only then acknowledged
                        a()
                    pending, acks, last = [], [], time.monotonic()
        finally:
            try:
                if acks:
                    self._commit(store, pending)
                    for a in acks:
                        a()
            finally:
                self.link.stop()
                store.close()
