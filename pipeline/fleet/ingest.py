"""``pipeline fleet ingest``: metrics, statuses and events from the fleet into the store.

Subscribes with a shared subscription (``$share/<group>/...``) so several ingesters split a large fleet,
keeps a persistent session, and acknowledges each QoS 1 message only after the batch holding it was
committed: a crash between batches loses nothing the broker was told we had.

Whatever a device publishes, the ingester goes on: each message is checked (topic, device id, size and nesting,
then the protocol's decoder) before anything parses or stores it, and one that fails is counted by reason
(``Drop``), logged (rate-limited), acknowledged and skipped. Within a stored metrics message, each traffic value
the store leaves out (``pipeline.fleet.traffic.Skip``) is counted in ``traffic_skipped``, each quality value (drift,
live accuracy, shadow: ``pipeline.fleet.quality.Skip``) in ``quality_skipped``.

Quality values are recorded right after the batch's own transaction (``pipeline.fleet.quality.ingest``), with
deploy.yaml's ``drift:`` thresholds deciding the drift events (the defaults without one); the batch is acknowledged
only once both committed, and a redelivered batch is recorded once (both follow the device's (boot, seq)).

Calibration timings (``<device>/calibration``) are not fleet telemetry: the command that asked for them collects
them (``pipeline targets calibrate``, pipeline.ota.calibration). The ingester does not subscribe to them, and one
that reaches it all the same (a bridge or a wildcard subscription) is ignored, counted in ``ignored``, never as a
dropped (malformed or refused) message.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.drift import Thresholds
from device_agent.mqtt import MqttLink
from device_agent.protocol import PROTOCOL_VERSION, Leaf, ProtocolError, check_id, decode, parse_topic

from . import quality
from .retention import RetentionPolicy, apply_retention
from .sql import ERRORS, unavailable
from .store import FleetStore
from .traffic import Skip

log = logging.getLogger(__name__)
LEAVES = (Leaf.METRICS, Leaf.STATUS, Leaf.EVENTS, Leaf.ONLINE)
#: leaves of device messages that are not telemetry: ignored, not dropped (see the module's note)
IGNORED = (Leaf.CALIBRATION,)
#: an agent's message is a few hundred bytes, two levels deep; these leave room and bound the parser's work
MAX_PAYLOAD = 64 * 1024
MAX_DEPTH = 16
#: the ingester's first wait before reconnecting to the broker (see Ingester.__init__)
RECONNECT_MIN_S = 0.1
Message = tuple[str, str, dict[str, Any]]  # (device id, leaf, body): what FleetStore.ingest takes


class Drop(str, enum.Enum):
    """Why a message was skipped: the ``reason`` label of ``edgefleet_ingest_dropped_messages_total``."""

    TOPIC = "topic"  # outside <prefix>/v1/<device>/<leaf>, or a leaf the ingester does not take
    DEVICE_ID = "device_id"  # the topic's device id breaks the protocol's rule (check_id)
    SIZE = "size"  # more than MAX_PAYLOAD bytes, or JSON nested deeper than MAX_DEPTH
    JSON = "json"  # not UTF-8 JSON
    SCHEMA = "schema"  # JSON, but not a message of this protocol version (or an online flag other than on/off)
    STORE = "store"  # the database refused it
    INTERNAL = "internal"  # anything else a message raised: a bug, counted instead of stopping the ingester


class Ignored(Exception):
    """A device message that is not the ingester's to store (``IGNORED``)."""


class Dropped(Exception):
    def __init__(self, reason: Drop, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")


def nesting(payload: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the JSON in ``payload`` nests (brackets inside strings do not count); stops counting past
    ``limit``. Cheap for what agents send: with no more brackets than ``limit``, nothing is scanned."""
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return 0
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b"", payload)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def _is_json(payload: bytes) -> bool:
    try:
        json.loads(payload)
    except Exception:
        return False
    return True


def parse(prefix: str, name: str, payload: bytes) -> Message:
    """One message from the broker as the store takes it, ``Dropped`` saying why not, or ``Ignored`` (a calibration
    message). Total: bounds are checked before the protocol's decoder parses anything, and nothing else comes out."""
    try:
        device, leaf = parse_topic(prefix, name)
    except ProtocolError as exc:
        raise Dropped(Drop.TOPIC, str(exc)) from None
    if leaf in IGNORED:
        raise Ignored(f"{leaf.value}: not telemetry")
    if leaf not in LEAVES:
        raise Dropped(Drop.TOPIC, f"topic {name!r}: the ingester does not take {leaf.value!r}")
    try:
        check_id(device, "device id")
    except ProtocolError as exc:
        raise Dropped(Drop.DEVICE_ID, str(exc)) from None
    if leaf is Leaf.ONLINE:
        if payload not in (b"online", b"offline"):
            raise Dropped(Drop.SCHEMA, f"online: expected b'online' or b'offline', got {payload[:40]!r}")
        return device, leaf.value, {"online": payload == b"online"}
    if len(payload) > MAX_PAYLOAD:
        raise Dropped(Drop.SIZE, f"{leaf.value}: {len(payload)} bytes, at most {MAX_PAYLOAD} taken")
    if nesting(payload) > MAX_DEPTH:
        raise Dropped(Drop.SIZE, f"{leaf.value}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return device, leaf.value, decode(payload, leaf.value)
    except ProtocolError as exc:
        raise Dropped(Drop.SCHEMA if _is_json(payload) else Drop.JSON, str(exc)) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5,000 digits, which json refuses to convert
        raise Dropped(Drop.JSON, f"{leaf.value}: payload is not JSON this host can read ({exc})") from None


class Ingester:
    def __init__(self, broker: BrokerConfig, db: Path | str, prefix: str = "edgefleet", group: str = "ingest",
                 shared: bool = True, batch: int = 500, flush_s: float = 0.5, client_id: str | None = None,
                 retention: RetentionPolicy | None = None, retention_every_s: float = 3600,
                 drift: Thresholds | None = None) -> None:
        """``drift``: the thresholds that raise drift events (deploy.yaml's ``drift:``, ``cfg.drift.thresholds()``);
        None: ``Thresholds()``, the defaults."""
        self.db, self.prefix, self.batch, self.flush_s = db, prefix, batch, flush_s
        self.thresholds = drift if drift is not None else Thresholds()
        self.retention, self.retention_every_s = retention, retention_every_s
        share = f"$share/{group}/" if shared else ""
        subs = [(f"{share}{prefix}/v{PROTOCOL_VERSION}/+/{leaf.value}", 1) for leaf in LEAVES]
        self._inbox: queue.Queue[tuple[str, bytes, Callable[[], None]]] = queue.Queue()
        # back within a tenth of a second after the broker restarts, ahead of the devices (whose links wait 1 s):
        # a restarted Mosquitto forgets shared subscriptions until their subscribers come back, and what it routes
        # to any other subscriber meanwhile the devices are told was delivered (device_agent.mqtt, "unrouted")
        self.link = MqttLink(broker, client_id or f"ingest-{group}", lambda t, p, ack: self._inbox.put((t, p, ack)),
                             subs, persistent=True, manual_ack=True, reconnect_min_s=RECONNECT_MIN_S)
        self.stored = 0  # rows written
        self.received = 0  # messages taken from the broker
        self.dropped_by: dict[Drop, int] = dict.fromkeys(Drop, 0)  # messages skipped, by reason
        self.ignored = 0  # messages of the IGNORED leaves: not telemetry, not dropped
        self.traffic_skipped: Counter = Counter()  # traffic values the store left out, by traffic.Skip
        self.quality_skipped: Counter = Counter()  # drift, accuracy and shadow values left out, by quality.Skip
        self.drift_events = 0  # drift_detected and drift_cleared events recorded
        self.error: str | None = None  # why run() stopped, when it failed
        self._stop = threading.Event()

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by.values())

    def counters(self) -> dict[str, Any]:
        """What /metrics exports of this ingester."""
        return {"received": self.received, "stored": self.stored, "up": int(self.error is None),
                "dropped": {r.value: n for r, n in self.dropped_by.items()},
                "traffic_skipped": {r.value: self.traffic_skipped[r] for r in Skip},
                "quality_skipped": {r.value: self.quality_skipped[r] for r in quality.Skip}}

    def stop(self) -> None:
        self._stop.set()

    def _drop(self, reason: Drop, name: str, why: object) -> None:
        n = self.dropped_by[reason] = self.dropped_by[reason] + 1
        if n == 1 or n % 1000 == 0:  # a flood of junk must not become a flood of log lines
            log.warning("dropped a message on %.200r (%s, %d so far): %.300s", name, reason.value, n, why)

    def handle(self, name: str, payload: bytes) -> Message | None:
        """One message from the broker: what to store, or None when it was dropped (and counted by reason) or
        ignored (counted in ``ignored``). Never raises."""
        try:
            return parse(self.prefix, name, payload)
        except Ignored:
            self.ignored += 1
        except Dropped as exc:
            self._drop(exc.reason, name, exc)
        except Exception as exc:  # noqa: BLE001 - the ingester outlives any one message
            self._drop(Drop.INTERNAL, name, f"{type(exc).__name__}: {exc}")
        return None

    def _commit(self, store: FleetStore, pending: list[Message]) -> None:
        """One transaction for the batch; if the database refuses what a message holds, message by message,
        dropping (and counting) only those it refuses: one bad message never stops the fleet's telemetry. When
        the store itself is unavailable (``sql.unavailable``: unreachable, restarting, locked, read-only), before or
        during that, it is raised and nothing is dropped: the caller keeps the whole batch unacknowledged and tries
        it again (what was stored of it is then a duplicate the store ignores)."""
        try:
            self._store(store, pending)
            return
        except Exception as batch_error:  # noqa: BLE001
            if unavailable(batch_error):
                raise
            log.warning("batch of %d refused (%s); storing message by message", len(pending), batch_error)
        refused: list[tuple[Message, Exception]] = []
        for message in pending:
            try:
                self._store(store, [message])
            except Exception as exc:  # noqa: BLE001
                if unavailable(exc):
                    raise
                refused.append((message, exc))
        for (device, leaf, _), exc in refused:
            self._drop(Drop.STORE, f"{self.prefix}/v{PROTOCOL_VERSION}/{device}/{leaf}", exc)

    def _store(self, store: FleetStore, messages: list[Message]) -> None:
        """The messages' rows, then their quality values: two transactions (the store's own ``ingest`` is one); a
        message stored again after the second failed is a duplicate the first ignores. ``stored`` grows once both
        are done: whoever waits on it finds the quality values committed too."""
        written = store.ingest(messages, skipped=self.traffic_skipped)
        try:
            self.drift_events += quality.ingest(store, messages, self.thresholds, skipped=self.quality_skipped)
        finally:
            self.stored += written

    def run(self, until: Callable[[], bool] | None = None) -> None:
        try:
            self._run(until)
        except Exception as exc:  # the dashboard shows it (healthz, /metrics) instead of a silent dead thread
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("ingester stopped: %s", self.error)
            raise

    def _retain(self, store: FleetStore) -> None:
        try:
            log.info("retention: %s", apply_retention(store, self.retention))
        except ERRORS as exc:  # the next pass tries again; telemetry goes on meanwhile
            log.warning("retention failed: %s", exc)

    def _run(self, until: Callable[[], bool] | None) -> None:
        store = FleetStore(self.db)  # before the link: an ingester that cannot store takes no share of the fleet
        try:
            self.link.start()
        except BaseException:
            store.close()
            raise
        pending: list[Message] = []
        acks: list[Callable[[], None]] = []
        last = time.monotonic()
        retained = float("-inf")
        try:
            while not self._stop.is_set() and not (until and until()):
                if self.retention and time.monotonic() - retained >= self.retention_every_s:
                    retained = time.monotonic()
                    self._retain(store)
                try:
                    name, payload, ack = self._inbox.get(timeout=0.1)
                    acks.append(ack)
                    self.received += 1
                    message = self.handle(name, payload)
                    if message is not None:
                        pending.append(message)
                except queue.Empty:
                    pass
                if acks and (len(acks) >= self.batch or time.monotonic() - last >= self.flush_s):
                    try:
                        self._commit(store, pending)  # committed ...
                    except ERRORS as exc:  # the store, not a message (_commit raises nothing else): keep the batch
                        log.warning("store unavailable (%s); the batch of %d waits, unacknowledged", exc, len(acks))
                        self._stop.wait(self.flush_s)
                        last = time.monotonic()
                        continue
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
