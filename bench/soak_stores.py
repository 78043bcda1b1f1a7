"""The fleet stores a soak writes to, as the soak sees them: a location (what ``pipeline fleet ingest --db`` takes)
and a way to count its metrics rows. One class per kind, registered by the location's scheme; a new kind (a new
backend of pipeline.fleet.store) is one class here."""

from __future__ import annotations

import sqlite3
from collections import Counter
from urllib.parse import urlparse

from pipeline.registry import Registry

#: scheme of a store's location ("" for a file path) -> its class
STORES: Registry[type["Store"]] = Registry("soak store")


class Store:
    kind = "store"

    def __init__(self, location: str) -> None:
        self.location = location

    def count(self) -> int:
        """Metrics rows now (0 before the store exists)."""
        raise NotImplementedError

    def metric_counts(self) -> Counter:
        """Rows per (device_id, ts) of the metrics table."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def open_store(location: str) -> Store:
    scheme = urlparse(location).scheme
    return STORES.get("" if len(scheme) <= 1 else scheme)(location)  # a one-letter scheme: a Windows drive


@STORES.register("")
@STORES.register("sqlite")
class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, location: str) -> None:
        super().__init__(location.removeprefix("sqlite://"))

    def _query(self, sql: str) -> list[tuple]:
        try:
            con = sqlite3.connect(f"file:{self.location}?mode=ro", uri=True, timeout=30)
        except sqlite3.OperationalError:  # not created yet
            return []
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError:  # created, not migrated yet
            return []
        finally:
            con.close()

    def count(self) -> int:
        rows = self._query("SELECT count(*) FROM metrics")
        return rows[0][0] if rows else 0

    def metric_counts(self) -> Counter:
        return Counter({(d, ts): n for d, ts, n in
                        self._query("SELECT device_id, ts, count(*) FROM metrics GROUP BY device_id, ts")})


@STORES.register("postgresql")
@STORES.register("postgres")
class PostgresStore(Store):
    """Read with psycopg 3 (the backend's own driver); ``ts`` compared as the float the device sent."""

    kind = "postgresql"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self._con = None

    def _query(self, sql: str) -> list[tuple]:
        import psycopg

        try:
            if self._con is None:
                self._con = psycopg.connect(self.location, autocommit=True)
            return self._con.execute(sql).fetchall()
        except psycopg.errors.UndefinedTable:  # not migrated yet
            return []

    def count(self) -> int:
        rows = self._query("SELECT count(*) FROM metrics")
        return rows[0][0] if rows else 0

    def metric_counts(self) -> Counter:
        return Counter({(d, float(ts)): n for d, ts, n in
                        self._query("SELECT device_id, ts, count(*) FROM metrics GROUP BY device_id, ts")})

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
