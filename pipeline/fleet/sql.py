"""The fleet store's two engines behind one connection type: SQLite (the embedded default, a file) and PostgreSQL
(psycopg 3, a ``postgresql://`` URL: several ingesters and a Grafana in front of one server).

The store's SQL is written once, in SQLite's spelling of a subset both engines run, and ``postgres`` rewrites it
for PostgreSQL:

- parameters: ``?`` and ``:name`` become ``%s`` and ``%(name)s`` (and a literal ``%`` ``%%``);
- ``INSERT OR IGNORE INTO ...`` becomes ``INSERT INTO ... ON CONFLICT DO NOTHING``;
- migrations (``ddl``): ``INTEGER`` is ``BIGINT`` (the store keeps 64-bit integers), ``REAL`` is ``DOUBLE
  PRECISION`` (PostgreSQL's REAL is 32 bits: a timestamp would lose its seconds), ``INTEGER PRIMARY KEY`` an
  identity column.

What the subset leaves out is not written: ``INSERT OR REPLACE`` (an upsert, ``upsert``, instead), ``rowid``, a
multi-argument ``max``/``min`` (``greatest``/``least``, which SQLite gets as functions with PostgreSQL's meaning:
NULL arguments are ignored), ``x IS y`` on values (``IS NULL`` only), an integer column as a condition (compare
it). Where one query cannot serve both, the caller asks ``Connection.engine``.
"""

from __future__ import annotations

import functools
import math
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import psycopg
    from psycopg.types.numeric import NumericBinaryLoader, NumericLoader
except ImportError:  # the [host] extra installs it; without it only SQLite stores open
    psycopg = None

SQLITE, POSTGRES = "sqlite", "postgresql"
#: the longest one PostgreSQL statement may run (retention's roll-up of a large fleet included)
STATEMENT_TIMEOUT_S = 600
#: the PostgreSQL channel a store's writes notify (see ``Connection.data_version``)
_CHANNEL = "edgefleet_store"
_URL = re.compile(r"^postgres(?:ql)?://", re.I)

#: what a store operation may raise for the database's sake (not a bug)
ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,) + ((psycopg.Error,) if psycopg else ())
#: ... and of those, what SQLite raises when the database is unavailable (locked, full, unreadable)
_SQLITE_UNAVAILABLE = (sqlite3.OperationalError,)
#: the SQLSTATE classes of a PostgreSQL error that one message caused (data exception, integrity constraint, a
#: program limit such as an index row too large): that message is refused; every other error is the store's
MESSAGE_SQLSTATE_CLASSES = ("22", "23", "54")


def refuses_message(exc: BaseException) -> bool:
    """Whether ``exc`` (one of ``ERRORS``) is the database refusing what one message holds, so that message is
    dropped (counted) and the rest go on; otherwise the store itself is unavailable (unreachable, restarting,
    locked, a deadlock, read-only after a failover, out of space or permissions) and a batch that met it waits,
    unacknowledged, to be tried again whole."""
    if isinstance(exc, sqlite3.Error):
        return not isinstance(exc, _SQLITE_UNAVAILABLE)
    if psycopg is not None and isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return True  # the server's classes 22 and 23, and what psycopg refuses to send (a NUL in a text)
    code = getattr(exc, "sqlstate", None)
    return isinstance(code, str) and code[:2] in MESSAGE_SQLSTATE_CLASSES


def unavailable(exc: BaseException) -> bool:
    """Of ``ERRORS``, the store's own trouble, not a message's (see ``refuses_message``)."""
    return isinstance(exc, ERRORS) and not refuses_message(exc)


def engine_of(location: str | Path) -> str:
    """``postgresql`` for a ``postgresql://`` (or ``postgres://``) URL, else ``sqlite`` (a file's path)."""
    return POSTGRES if isinstance(location, str) and _URL.match(location) else SQLITE


def redact(location: str | Path) -> str:
    """A location fit for a log line or an error: a URL's password is left out."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(location))


_LITERAL = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")  # quoted literals and identifiers
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def postgres(sql: str) -> str:
    """``sql`` (the store's SQLite spelling, see the module's note) as PostgreSQL runs it through psycopg."""
    parts = _LITERAL.split(sql.replace("%", "%%"))  # psycopg reads % anywhere, quotes too (params always passed)
    for i in range(0, len(parts), 2):  # outside quotes
        parts[i] = _NAMED.sub(r"%(\1)s", parts[i].replace("?", "%s"))
    out = "".join(parts)
    if re.match(r"\s*INSERT\s+OR\s+IGNORE\s+INTO\b", out, re.I):
        out = re.sub(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", "INSERT INTO", out, count=1, flags=re.I)
        out = out.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    return out


def ddl(sql: str, engine: str) -> str:
    """A migration's statement for ``engine`` (see the module's note)."""
    if engine != POSTGRES:
        return sql
    sql = re.sub(r"\bINTEGER\s+PRIMARY\s+KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


def upsert(table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
    """INSERT of ``columns`` that replaces the row with the same ``keys`` (its primary key): what SQLite's
    ``INSERT OR REPLACE`` does to a table with no other unique index, in the spelling both engines share."""
    rest = [c for c in columns if c not in keys]
    action = f"DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in rest)}" if rest else "DO NOTHING"
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))}) "
            f"ON CONFLICT ({', '.join(keys)}) {action}")


def _greatest(*args: Any) -> Any:
    values = [a for a in args if a is not None]
    return max(values) if values else None


def _least(*args: Any) -> Any:
    values = [a for a in args if a is not None]
    return min(values) if values else None


class Row:
    """A PostgreSQL row as ``sqlite3.Row`` is one: by position (``r[0]``) or by name (``r["ts"]``), and
    ``dict(r)``."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names, self._values = names, values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._names[key]]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values))!r})"


def _rows(cursor: Any):
    names = {d.name: i for i, d in enumerate(cursor.description or ())}
    return lambda values: Row(names, values)


if psycopg is not None:
    def _number(d: Any) -> int | float:
        """A NUMERIC (PostgreSQL's sum of integers, its average) as SQLite gives it: an int when whole."""
        return int(d) if d.is_finite() and d == d.to_integral_value() else float(d)

    class _Numeric(NumericLoader):
        def load(self, data: Any) -> int | float:
            return _number(super().load(data))

    class _NumericBinary(NumericBinaryLoader):
        def load(self, data: Any) -> int | float:
            return _number(super().load(data))


class Connection:
    """One connection to a store, of either engine; not for sharing between threads (``FleetStore`` keeps one per
    thread). ``execute`` returns a cursor whose rows index by position and by name."""

    def __init__(self, location: str | Path, readonly: bool = False, timeout_s: float = 30) -> None:
        self.location, self.readonly = location, readonly
        self.engine = engine_of(location)
        self._in_transaction = False
        self._listening, self._notified = False, 0
        if self.engine == POSTGRES:
            if psycopg is None:
                raise ImportError("a postgresql:// fleet store needs psycopg 3: pip install 'psycopg[binary]' "
                                  "(the [host] extra installs it)")
            # a peer that went silent (a partition, a frozen server) is noticed in about half a minute, not after
            # the OS's keepalive time of hours
            self._con = psycopg.connect(str(location), autocommit=True, row_factory=_rows,
                                        connect_timeout=max(1, int(timeout_s)), keepalives=1, keepalives_idle=10,
                                        keepalives_interval=5, keepalives_count=3,
                                        tcp_user_timeout=int(timeout_s * 1000))
            self._con.adapters.register_loader("numeric", _Numeric)
            self._con.adapters.register_loader("numeric", _NumericBinary)
            if readonly:
                self._con.execute("SET default_transaction_read_only = on")
            # a statement that waits on another's lock gives up (and the batch is tried again) rather than hang
            self._con.execute(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'")
            self._con.execute(f"SET statement_timeout = '{int(STATEMENT_TIMEOUT_S * 1000)}ms'")
        else:
            if readonly:
                con = sqlite3.connect(f"file:{location}?mode=ro", uri=True, timeout=timeout_s, isolation_level=None,
                                      check_same_thread=False)
            else:
                con = sqlite3.connect(location, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.create_function("greatest", -1, _greatest, deterministic=True)
            con.create_function("least", -1, _least, deterministic=True)
            try:
                con.execute("SELECT floor(1.5)")
            except sqlite3.OperationalError:  # an SQLite built without its math functions
                con.create_function("floor", 1, lambda x: None if x is None else math.floor(x), deterministic=True)
            self._con = con

    @property
    def broken(self) -> bool:
        """The server went away (PostgreSQL): this connection cannot be used again; open another."""
        return self.engine == POSTGRES and (self._con.closed or self._con.broken)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        if self.engine == POSTGRES:
            return self._con.execute(postgres(sql), params)  # () too: psycopg then reads %% as %
        return self._con.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self.engine == POSTGRES:
            rows = list(rows)
            if rows:
                with self._con.cursor() as cur:
                    cur.executemany(postgres(sql), rows)
            return
        self._con.executemany(sql, rows)

    def insert(self, sql: str, params: Sequence[Any]) -> int:
        """An INSERT into a table whose key is an ``INTEGER PRIMARY KEY`` named ``id``: the new row's id."""
        if self.engine == POSTGRES:
            return int(self._con.execute(postgres(sql) + " RETURNING id", params).fetchone()[0])
        return int(self._con.execute(sql, params).lastrowid)

    @contextmanager
    def transaction(self, immediate: bool = False) -> Iterator["Connection"]:
        """One transaction: committed when the block ends, rolled back when it raises. ``immediate`` (SQLite):
        take the write lock now, not at the first write (a reader that would write later cannot deadlock)."""
        if self._in_transaction:
            raise RuntimeError("transactions do not nest")
        self._in_transaction = True
        try:
            if self.engine == POSTGRES:
                with self._con.transaction():
                    yield self
                    if not self.readonly:  # heard by every connection of this database's data_version
                        self._con.execute(f"NOTIFY {_CHANNEL}")
                return
            self._con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield self
            except BaseException:
                self._con.rollback()
                raise
            self._con.commit()
        finally:
            self._in_transaction = False

    def lock(self, key: int, shared: bool = False) -> None:
        """Within a transaction, wait for and hold (until it ends) the store-wide lock ``key``, ``shared`` with
        other holders or not: PostgreSQL's advisory lock; SQLite's immediate transaction already holds the file."""
        if self.engine == POSTGRES:
            self._con.execute(f"SELECT pg_advisory_xact_lock{'_shared' if shared else ''}(%s)", (key,))

    def lock_each(self, keys: Iterable[str]) -> None:
        """Within a transaction, hold (until it ends) a lock per key, taken in the keys' order: PostgreSQL's
        advisory locks, so that two writers that read a device's rows and then write them (shared-subscription
        ingesters) take turns per device, never lose one's update to the other, and cannot deadlock on each other.
        SQLite: nothing to do, an immediate transaction holds the whole file."""
        if self.engine == POSTGRES:
            keys = sorted(set(keys))
            if keys:
                self._con.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM "
                                  "(SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS s", (keys,))

    def data_version(self) -> int:
        """A number that changes whenever another connection commits: what live views poll. SQLite's own counter
        (per connection); on PostgreSQL, the notifications this connection heard: every write transaction of a
        store's connection ends with a NOTIFY on the database's channel, delivered to listeners when it commits
        (so a commit to another database of the server, or a reader's query, changes nothing)."""
        if self.engine == POSTGRES:
            if not self._listening:
                self._con.add_notify_handler(self._heard)
                self._con.execute(f"LISTEN {_CHANNEL}")
                self._listening = True
            self._con.execute("SELECT 1")  # reads what arrived: the handler counts it
            return self._notified
        return int(self._con.execute("PRAGMA data_version").fetchone()[0])

    def _heard(self, _notify: Any) -> None:
        self._notified += 1

    def tables(self) -> set[str]:
        """The store's tables (what a migration finds)."""
        if self.engine == POSTGRES:
            sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        return {r[0] for r in self.execute(sql)}

    def close(self) -> None:
        self._con.close()


class PerThread:
    """One ``Connection`` per thread that asks, opened on first use by ``open``, reopened when the server broke it;
    ``close`` closes them all."""

    def __init__(self, open_: Any) -> None:
        self._open = open_
        self._local = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def get(self) -> Connection:
        con = getattr(self._local, "con", None)
        if con is not None and con.broken:
            with self._lock:
                self._all.remove(con)
            try:
                con.close()
            except ERRORS:
                pass
            con = None
        if con is None:
            con = self._open()
            self._local.con = con
            with self._lock:
                self._all.append(con)
        return con

    def all(self) -> list[Connection]:
        """Every thread's open connection."""
        with self._lock:
            return list(self._all)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for con in connections:
            try:
                con.close()
            except ERRORS:
                pass
        self._local = threading.local()
