"""The fleet store: deployment history, per-device results, telemetry. Schema migrations are numbered.

Two engines (``pipeline.fleet.sql``): SQLite in WAL mode, a file, the default; PostgreSQL, a ``postgresql://`` URL
(deploy.yaml's ``fleet.store``), for a fleet with several ingesters. The same migrations, queries and retention run
on both.

One ``FleetStore`` may be shared by threads: each thread that touches ``store.db`` gets its own connection
(connections are not for sharing), opened once and kept until ``close()`` (a PostgreSQL connection the server broke
is opened again on next use). A store that is already at the latest schema is not migrated again: opening it reads
``schema_version`` and takes no write lock. States a
running deployment reports from paho's network thread go through a ``ProgressQueue``: the callback only
queues, the store's own writer thread writes them."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import StoreError
from . import traffic
from .sql import ERRORS, SQLITE, Connection, PerThread, ddl, engine_of, redact

log = logging.getLogger(__name__)

MIGRATIONS = [
    """CREATE TABLE deployments (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, name TEXT NOT NULL, target TEXT NOT NULL,
        version INTEGER NOT NULL, sha256 TEXT NOT NULL, artifact TEXT NOT NULL, kind TEXT NOT NULL,
        status TEXT NOT NULL, reason TEXT, rollout TEXT)""",
    """CREATE TABLE device_results (
        deployment_id INTEGER NOT NULL REFERENCES deployments(id), device_id TEXT NOT NULL, phase TEXT,
        status TEXT NOT NULL, active_version INTEGER, reason TEXT, metrics TEXT)""",
    "CREATE INDEX device_results_by_device ON device_results(device_id)",
    """CREATE TABLE devices (
        device_id TEXT PRIMARY KEY, target TEXT, online INTEGER, last_seen REAL, active_version INTEGER,
        slot TEXT, state TEXT)""",
    """CREATE TABLE metrics (
        device_id TEXT NOT NULL, ts REAL NOT NULL, version INTEGER, latency_ms_p50 REAL, latency_ms_p95 REAL,
        latency_ms_p99 REAL, throughput_ips REAL, rss_mb REAL, cpu_percent REAL, temperature_c REAL,
        energy_mj REAL, energy_source TEXT, emulated INTEGER, UNIQUE (device_id, ts))""",
    """CREATE TABLE events (
        device_id TEXT NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL, message TEXT, job_id TEXT, version INTEGER,
        UNIQUE (device_id, ts, kind))""",
    "ALTER TABLE metrics ADD COLUMN errors INTEGER",
    "ALTER TABLE metrics ADD COLUMN uptime_s REAL",
    "ALTER TABLE devices ADD COLUMN job_id TEXT",
    "ALTER TABLE devices ADD COLUMN job_version INTEGER",
    "ALTER TABLE devices ADD COLUMN progress REAL",
    "ALTER TABLE devices ADD COLUMN agent_version TEXT",
    "ALTER TABLE devices ADD COLUMN reason TEXT",
    "CREATE INDEX metrics_by_ts ON metrics(ts)",
    "CREATE INDEX events_by_ts ON events(ts)",
    # raw metrics older than the retention window, averaged (or maxed: tails, memory, heat) per time bucket
    """CREATE TABLE metrics_rollup (
        device_id TEXT NOT NULL, ts REAL NOT NULL, bucket_s REAL NOT NULL, samples INTEGER NOT NULL,
        version INTEGER, latency_ms_p50 REAL, latency_ms_p95 REAL, latency_ms_p99 REAL, throughput_ips REAL,
        rss_mb REAL, cpu_percent REAL, temperature_c REAL, energy_mj REAL, errors INTEGER, emulated INTEGER,
        PRIMARY KEY (device_id, ts))""",
    # the device's own order (agent start, message counter) of the last message applied to its row: statuses are
    # ordered by it, never by comparing the device's clock with the host's
    "ALTER TABLE devices ADD COLUMN boot INTEGER",
    "ALTER TABLE devices ADD COLUMN seq INTEGER",
    # what was predicted for the deployed artifact (JSON: {"target": {...}, "host": {...}}, see
    # pipeline.fleet.accuracy): the fleet's measurements are set against it; NULL on older deployments
    "ALTER TABLE deployments ADD COLUMN predicted TEXT",
    # each device's latest reports of one version, found by seeking, not by sorting the whole table
    "CREATE INDEX metrics_by_series ON metrics(device_id, version, emulated, ts)",
    # the inference API's traffic (pipeline.fleet.traffic): per device and agent boot its latest snapshot's order
    # and own figures (folded = 1: the sum of the boots retention folded, up to this one) ...
    """CREATE TABLE traffic_boots (
        device_id TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, rejected INTEGER,
        queue_depth INTEGER, queue_peak INTEGER, folded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (device_id, boot))""",
    # ... and per device, boot and version (-1: no model) the totals and the snapshot they last grew from (JSON
    # traffic.Counts; last is NULL on a folded row)
    """CREATE TABLE traffic (
        device_id TEXT NOT NULL, boot INTEGER NOT NULL, version INTEGER NOT NULL, ts REAL NOT NULL,
        total TEXT NOT NULL, last TEXT, PRIMARY KEY (device_id, boot, version))""",
    # every calibration of a device class (pipeline.fleet.accuracy.record_calibration): basis "suite" (timed on its
    # devices) or "from_fleet" (refit with the fleet's measured models); devices, samples and fit are JSON
    """CREATE TABLE calibrations (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, target TEXT NOT NULL, version INTEGER NOT NULL, date TEXT,
        basis TEXT NOT NULL, devices TEXT, samples TEXT, wall_s REAL, fit TEXT, kernels_file TEXT)""",
    # the model's behaviour on live traffic (pipeline.fleet.quality): per device and version the latest drift scores
    # in the device's order (JSON DriftScores), their state under the thresholds recorded beside them, the scores
    # above them (JSON), and alarm = 1 from a drift_detected event until its drift_cleared ...
    """CREATE TABLE quality_drift (
        device_id TEXT NOT NULL, version INTEGER NOT NULL, boot INTEGER, seq INTEGER, ts REAL NOT NULL,
        scores TEXT NOT NULL, state TEXT NOT NULL, drifting TEXT, thresholds TEXT, alarm INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, version))""",
    # ... live accuracy per device and agent boot: the latest snapshot's order and its unmatched feedback ...
    """CREATE TABLE quality_accuracy_boots (
        device_id TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, unmatched INTEGER,
        window_s REAL, PRIMARY KEY (device_id, boot))""",
    # ... and per device, boot and version the totals and the snapshot they last grew from ...
    """CREATE TABLE quality_accuracy (
        device_id TEXT NOT NULL, boot INTEGER NOT NULL, version INTEGER NOT NULL, ts REAL NOT NULL,
        labelled INTEGER NOT NULL, correct INTEGER NOT NULL, last_labelled INTEGER, last_correct INTEGER,
        PRIMARY KEY (device_id, boot, version))""",
    # ... and a shadowed candidate's comparison per device, boot and candidate (JSON quality.Comparison)
    """CREATE TABLE quality_shadow (
        device_id TEXT NOT NULL, boot INTEGER NOT NULL, candidate INTEGER NOT NULL, seq INTEGER NOT NULL,
        ts REAL NOT NULL, active INTEGER, sample REAL, top1 INTEGER, total TEXT NOT NULL, last TEXT,
        PRIMARY KEY (device_id, boot, candidate))""",
]

METRIC_COLUMNS = ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "throughput_ips", "rss_mb", "cpu_percent",
                  "temperature_c", "energy_mj", "energy_source", "errors", "uptime_s")
#: the series a chart can draw, from raw rows and rollups alike
SERIES_COLUMNS = ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "throughput_ips", "rss_mb", "cpu_percent",
                  "temperature_c", "energy_mj", "errors")


_NUMBERS = {"ts", "last_seen", "version", "active_version", "progress", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
            "throughput_ips", "rss_mb", "cpu_percent", "temperature_c", "energy_mj", "errors", "uptime_s"}
_TEXTS = {"target", "state", "slot", "active_slot", "job_id", "reason", "agent_version", "kind", "message",
          "energy_source"}
_ORDER = {"boot", "seq"}
#: the numbers stored in INTEGER columns: a whole number (or a float that is one), else unknown
_INTEGERS = {"version", "active_version", "errors"}
#: what SQLite's INTEGER holds; a bigger JSON integer is unknown, not an OverflowError
_INT64 = 2**63
#: a text field longer than this is cut (devices bound what they echo; the store does not rely on it)
MAX_TEXT = 2048
#: ... and an event's kind, part of a unique index, this many characters (PostgreSQL's index rows hold ~2.7 KB)
MAX_KIND = 200


def _text(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    v = v[:MAX_TEXT]
    if not v.isascii():  # a lone surrogate (JSON allows "\ud800") cannot be stored as UTF-8: replaced
        v = v.encode("utf-8", "replace").decode("utf-8")
    return v.replace("\x00", "\ufffd")  # PostgreSQL's text holds no NUL


def clean(body: dict[str, Any]) -> dict[str, Any]:
    """A message's fields as the store's columns take them: a number that is not a finite number (or an integer
    beyond 64 bits), or a text that is not text, becomes unknown (None) rather than a crash or a value no view can
    compare; ``boot`` and ``seq`` are non-negative integers or unknown."""
    out = dict(body)
    for k in _NUMBERS & out.keys():
        v = out[k]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        out[k] = v if ok and (isinstance(v, float) or -_INT64 < v < _INT64) else None
    for k in _INTEGERS & out.keys():
        v = out[k]
        if isinstance(v, float):
            out[k] = int(v) if v.is_integer() and -_INT64 < v < _INT64 else None
    for k in _TEXTS & out.keys():
        out[k] = _text(out[k])
    if isinstance(out.get("kind"), str):
        out["kind"] = out["kind"][:MAX_KIND]
    for k in _ORDER & out.keys():
        v = out[k]
        out[k] = v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _INT64 else None
    return out


def _json(value: dict[str, Any] | None) -> str | None:
    """A dict as strict JSON (a NaN or infinity becomes null: no reader has to cope with them), None as NULL."""
    if not value:
        return None

    def finite(v: Any) -> Any:
        if isinstance(v, float) and (v != v or abs(v) == float("inf")):
            return None
        if isinstance(v, dict):
            return {str(k): finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), default=str)


def _result_rows(deployment_id: int, results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Device results as rows: what came from a device (its reason, a phase or status it named) as ``clean`` takes
    text, so that a NUL or a lone surrogate in a device's words cannot leave a deployment unrecorded."""
    def version(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and -_INT64 < v < _INT64 else None

    return [(deployment_id, _text(r["device_id"]), _text(r.get("phase")), _text(r["status"]) or "unknown",
             version(r.get("active_version")), _text(r.get("reason")), _json(r.get("metrics")))
            for r in results]


def order(body: dict[str, Any]) -> tuple[int, int] | tuple[None, None]:
    """(boot, seq) when the message carries both (see ``clean``), else (None, None): then arrival order rules."""
    boot, seq = body.get("boot"), body.get("seq")
    return (boot, seq) if boot is not None and seq is not None else (None, None)


#: the advisory lock a PostgreSQL migration holds: of several processes opening a store at once, one migrates
_MIGRATION_LOCK = 0x6564676566  # "edgef"
#: ... and the one telemetry writers hold shared (ingesters, with their per-device locks) and retention alone: it
#: rewrites many devices' rows at once, more than per-device locks could name (PostgreSQL's lock table is finite)
WRITERS_LOCK = _MIGRATION_LOCK + 1


class FleetStore:
    def __init__(self, path: Path | str, readonly: bool = False) -> None:
        """``path``: a SQLite file, or a ``postgresql://`` URL (``pipeline.fleet.sql``). ``readonly``: a reader
        beside a writer (the dashboard); it never migrates. This thread's connection is opened (and the store
        created or migrated) here, so a bad location fails now, not on first use."""
        self.path, self.readonly = path, readonly
        self.engine = engine_of(path)
        self.where = redact(path)  # for log lines and errors: a URL's password left out
        if self.engine == SQLITE:
            self.path = Path(path)
        self._connections = PerThread(lambda: self._connect())  # looked up when called
        try:
            if self.engine == SQLITE and not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db  # noqa: B018 -- this thread's connection, now
        except (*ERRORS, OSError) as exc:
            raise StoreError(f"fleet store {self.where}: cannot open it: {str(exc).strip()}") from exc

    @property
    def db(self) -> Connection:
        """The calling thread's connection to the store, opened on its first use."""
        return self._connections.get()

    def _connect(self) -> Connection:
        con = Connection(self.path, readonly=self.readonly)
        try:
            if not self.readonly:
                if self.engine == SQLITE:
                    con.execute("PRAGMA journal_mode=WAL")
                    con.execute("PRAGMA synchronous=NORMAL")
                if self._schema_version(con) != len(MIGRATIONS):
                    self._migrate(con)
        except BaseException:
            con.close()
            raise
        return con

    def data_version(self) -> int:
        """Changes whenever another connection commits: what live views poll (always from one thread: each
        thread's connection counts on its own)."""
        return self.db.data_version()

    @staticmethod
    def _schema_version(con: Connection) -> int | None:
        if "schema_version" not in con.tables():  # a new store
            return None
        row = con.execute("SELECT v FROM schema_version").fetchone()
        return row["v"] if row else None

    def _migrate(self, con: Connection) -> None:
        """Numbered migrations, all pending ones in one transaction that holds the store's write lock (SQLite) or
        its migration lock (PostgreSQL): of several processes opening a store at once, one migrates and the
        others then find it done."""
        with con.transaction(immediate=True):
            con.lock(_MIGRATION_LOCK)
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (v INTEGER NOT NULL)")
            row = con.execute("SELECT v FROM schema_version").fetchone()
            current = row["v"] if row else 0
            if not row:
                con.execute("INSERT INTO schema_version VALUES (0)")
            for sql in MIGRATIONS[current:]:
                con.execute(ddl(sql, con.engine))
            if current < len(MIGRATIONS):
                con.execute("UPDATE schema_version SET v = ?", (len(MIGRATIONS),))
                log.info("%s: schema migrated from v%d to v%d", self.where, current, len(MIGRATIONS))

    def record(self, *, name: str, target: str, version: int, sha256: str, artifact: str, kind: str, status: str,
               reason: str | None, results: list[dict[str, Any]], rollout: dict[str, Any] | None = None,
               predicted: dict[str, Any] | None = None) -> int:
        """One deployment and its device results, in one transaction. ``predicted``: what was predicted for the
        artifact, per basis (``pipeline.fleet.accuracy.predictions``); the fleet's measurements are set against it."""
        with self.db.transaction() as db:
            dep = db.insert(
                "INSERT INTO deployments (ts, name, target, version, sha256, artifact, kind, status, reason, rollout,"
                " predicted) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), name, target, version, sha256, artifact, kind, status, reason,
                 json.dumps(rollout) if rollout else None, _json(predicted)))
            db.executemany("INSERT INTO device_results VALUES (?,?,?,?,?,?,?)", _result_rows(dep, results))
        return int(dep)

    def start(self, *, name: str, target: str, version: int, sha256: str, artifact: str, kind: str,
              devices: list[str], predicted: dict[str, Any] | None = None) -> int:
        """A deployment as it begins: ``in_progress``, every device ``pending``; ``progress`` and ``finish``
        follow. What the dashboard shows while a rollout runs. ``predicted``: as for ``record``."""
        with self.db.transaction() as db:
            dep = db.insert(
                "INSERT INTO deployments (ts, name, target, version, sha256, artifact, kind, status, predicted)"
                " VALUES (?,?,?,?,?,?,?,?,?)", (time.time(), name, target, version, sha256, artifact, kind,
                                                "in_progress", _json(predicted)))
            db.executemany("INSERT INTO device_results (deployment_id, device_id, status) VALUES (?,?,?)",
                                [(dep, d, "pending") for d in devices])
        return int(dep)

    def progress(self, deployment_id: int, device_id: str, status: str) -> None:
        """One device's state in a running deployment, on the calling thread's connection. From a thread that
        must not wait on SQLite (paho's network thread), put it on a ``ProgressQueue`` instead."""
        with self.db.transaction() as db:
            db.execute("UPDATE device_results SET status = ? WHERE deployment_id = ? AND device_id = ?",
                       (status, deployment_id, device_id))

    def progress_queue(self, deployment_id: int) -> "ProgressQueue":
        """``with store.progress_queue(dep) as q: ... q.put(device, state)`` from any thread."""
        return ProgressQueue(self, deployment_id)

    def finish(self, deployment_id: int, *, status: str, reason: str | None, results: list[dict[str, Any]],
               rollout: dict[str, Any] | None = None) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE deployments SET status = ?, reason = ?, rollout = ? WHERE id = ?",
                       (status, reason, json.dumps(rollout) if rollout else None, deployment_id))
            db.execute("DELETE FROM device_results WHERE deployment_id = ?", (deployment_id,))
            db.executemany("INSERT INTO device_results VALUES (?,?,?,?,?,?,?)", _result_rows(deployment_id, results))

    def history(self, target: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT * FROM deployments" + (" WHERE target = ?" if target else "") + " ORDER BY id DESC LIMIT ?"
        rows = self.db.execute(sql, ((target, limit) if target else (limit,))).fetchall()
        return [dict(r) for r in rows]

    def deployment(self, target: str, version: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM deployments WHERE target = ? AND version = ? ORDER BY id DESC LIMIT 1",
                              (target, version)).fetchone()
        return dict(row) if row else None

    def results(self, deployment_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM device_results WHERE deployment_id = ?",
                                                 (deployment_id,)).fetchall()]

    def ingest(self, messages: list[tuple[str, str, dict[str, Any]]], now: float | None = None,
               skipped: Counter | None = None) -> int:
        """Store a batch of (device_id, kind, body) in one transaction; duplicates (QoS 1 redeliveries) are
        ignored, fields of the wrong type are stored as unknown (see ``clean``). Returns the rows written.
        A metrics message's ``traffic`` goes to ``pipeline.fleet.traffic.record``; what it leaves out is added to
        ``skipped`` (by ``traffic.Skip``) once the batch is committed.

        A device's row follows what it said in its own order, (boot, seq), or in arrival order for messages that
        carry none; its clock dates its metrics and events but never decides which status wins. ``last_seen`` is
        the host's time of storing (``now``), the online flag its own column."""
        now = time.time() if now is None else now
        written = 0
        skips: Counter = Counter()
        messages = sorted(messages, key=lambda m: m[0])  # by device, each device's in arrival order (a stable sort)
        with self.db.transaction(immediate=True) as db:
            db.lock(WRITERS_LOCK, shared=True)
            db.lock_each(device for device, _, _ in messages)  # see sql.Connection.lock_each
            for device, kind, b in messages:
                b = clean(b)
                ts = b.get("ts") or now
                if kind == "metrics":
                    cur = db.execute(
                        f"INSERT OR IGNORE INTO metrics (device_id, ts, version, {', '.join(METRIC_COLUMNS)}, emulated)"
                        f" VALUES (?,?,?,{','.join('?' * len(METRIC_COLUMNS))},?)",
                        (device, ts, b.get("version"), *[b.get(c) for c in METRIC_COLUMNS], int(bool(b.get("emulated")))))
                    written += cur.rowcount
                    self._seen(device, now, order(b), active_version=b.get("version"), slot=b.get("slot"),
                               state=b.get("state"))
                    if b.get("traffic") is not None:
                        traffic.record(db, device, *order(b), now, b["traffic"], skips)  # beside the row
                elif kind == "status":
                    self._seen(device, now, order(b), target=b.get("target"), active_version=b.get("active_version"),
                               slot=b.get("active_slot"), state=b.get("state"), job_id=b.get("job_id"),
                               job_version=b.get("version"), progress=b.get("progress"),
                               agent_version=b.get("agent_version"), reason=b.get("reason"))
                    written += 1
                elif kind == "events":
                    # an event whose kind is missing or not text is kept as "unknown", not lost to NOT NULL
                    cur = db.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)",
                                          (device, ts, b.get("kind") or "unknown", b.get("message"), b.get("job_id"),
                                           b.get("version")))
                    written += cur.rowcount
                elif kind == "online":
                    # coming online starts the device's order afresh: an agent whose boot counter went back (its
                    # state reset) is followed again; going offline (the last will) is no sign of life
                    db.execute(
                        "INSERT INTO devices (device_id, online, last_seen) VALUES (?,?,?) "
                        "ON CONFLICT(device_id) DO UPDATE SET online = excluded.online, "
                        "last_seen = CASE WHEN excluded.online <> 0 THEN greatest(coalesce(devices.last_seen, 0), "
                        "excluded.last_seen) ELSE devices.last_seen END, "
                        "boot = CASE WHEN excluded.online <> 0 THEN NULL ELSE devices.boot END, "
                        "seq = CASE WHEN excluded.online <> 0 THEN NULL ELSE devices.seq END",
                        (device, int(bool(b.get("online", False))), now))
        if skipped is not None:
            skipped.update(skips)
        return written

    #: status fields that describe the current job: cleared, not kept, when a status leaves them out
    _JOB_FIELDS = ("job_id", "job_version", "progress", "reason")
    #: a message applies when it, or the row, has no order, or when it comes at or after the row's (boot, seq)
    _IN_ORDER = ("(excluded.boot IS NULL OR devices.boot IS NULL "
                 "OR (excluded.boot, excluded.seq) >= (devices.boot, devices.seq))")

    def _seen(self, device: str, now: float, at: tuple[int, int] | tuple[None, None], **fields: Any) -> None:
        """Upsert what a device said; one said earlier in its own order (shared-subscription ingesters commit out
        of order) never overwrites a later one's fields. A message without an order applies in arrival order and
        keeps the row's order for the device's later messages."""
        fields = {k: v for k, v in fields.items() if v is not None or k in self._JOB_FIELDS}
        cols = ", ".join(["device_id", "last_seen", "boot", "seq", *fields])
        ok = self._IN_ORDER
        updates = ", ".join([*[f"{k} = CASE WHEN {ok} THEN excluded.{k} ELSE devices.{k} END" for k in fields],
                             *[f"{k} = CASE WHEN {ok} THEN coalesce(excluded.{k}, devices.{k}) ELSE devices.{k} END"
                               for k in ("boot", "seq")],
                             "last_seen = greatest(coalesce(devices.last_seen, 0), excluded.last_seen)"])
        self.db.execute(f"INSERT INTO devices ({cols}) VALUES ({','.join('?' * (4 + len(fields)))}) "
                        f"ON CONFLICT(device_id) DO UPDATE SET {updates}", (device, now, *at, *fields.values()))

    def devices(self) -> list[dict[str, Any]]:
        """Every device with its latest raw metrics (or None), in two queries whatever the fleet's size. Rows read
        are cleaned as rows written are (``clean``): a store another writer filled cannot crash a view."""
        latest = {r["device_id"]: clean(dict(r)) for r in self.db.execute(
            "SELECT m.* FROM metrics m JOIN (SELECT device_id, max(ts) AS ts FROM metrics GROUP BY device_id) l "
            "ON m.device_id = l.device_id AND m.ts = l.ts")}
        rows = [{**clean(dict(r)), "metrics": latest.get(r["device_id"])}
                for r in self.db.execute("SELECT * FROM devices")]
        return sorted(rows, key=lambda d: d["device_id"])  # by code point on both engines, whatever the collation

    def series(self, device: str, since: float = 0.0, limit: int = 5000) -> list[dict[str, Any]]:
        """One device's metrics over time, oldest first: rollups (older) then raw rows, ``limit`` newest points."""
        cols = ", ".join(SERIES_COLUMNS)
        rows = self.db.execute(
            f"SELECT * FROM (SELECT ts, version, {cols}, emulated, 1 AS samples, 0 AS bucket_s FROM metrics "
            f"WHERE device_id = ? AND ts >= ? UNION ALL SELECT ts, version, {cols}, emulated, samples, bucket_s "
            f"FROM metrics_rollup WHERE device_id = ? AND ts >= ?) AS s ORDER BY ts DESC LIMIT ?",
            (device, since, device, since, limit)).fetchall()
        return [clean(dict(r)) for r in reversed(rows)]

    def events(self, limit: int = 100, device: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events" + (" WHERE device_id = ?" if device else "") + " ORDER BY ts DESC LIMIT ?"
        return [dict(r) for r in self.db.execute(sql, ((device, limit) if device else (limit,))).fetchall()]

    def count(self, table: str) -> int:
        if table not in ("metrics", "metrics_rollup", "events", "devices", "deployments", "traffic", "traffic_boots"):
            raise ValueError(table)
        return int(self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def close(self) -> None:
        """Close every thread's connection (call it once the other threads are done with the store)."""
        self._connections.close()


class ProgressQueue:
    """The states devices report during a deployment, from whatever thread reports them (the rollout's
    callback runs on paho's network thread), written in order by one writer thread on its own connection to
    the store: the callback never waits on SQLite (a busy store cannot stall the MQTT loop) and the database
    is not reopened per callback. Leaving the ``with`` writes what is queued, then stops the writer, so that
    nothing lands after the deployment's ``finish``."""

    _STOP = None

    def __init__(self, store: FleetStore, deployment_id: int) -> None:
        self.store, self.deployment_id = store, deployment_id
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write, name=f"fleet-progress-{deployment_id}", daemon=True)
        self.written = 0

    def put(self, device_id: str, status: str) -> None:
        """Any thread; returns at once."""
        self._queue.put((device_id, status))

    def _write(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            try:
                self.store.progress(self.deployment_id, *item)
                self.written += 1
            except ERRORS as exc:  # the live view misses one state; the deployment's finish is whole
                log.warning("%s: progress of %s not stored: %s", self.store.where, item[0], exc)
        # the writer's connection is the store's: closed with it

    def start(self) -> "ProgressQueue":
        self._writer.start()
        return self

    def stop(self) -> None:
        self._queue.put(self._STOP)
        self._writer.join()

    def __enter__(self) -> "ProgressQueue":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
