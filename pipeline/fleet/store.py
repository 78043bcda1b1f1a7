"""SQLite fleet store (WAL): deployment history, per-device results. Schema migrations are numbered."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

MIGRATIONS = [
    """CREATE TABLE deployments (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, name TEXT NOT NULL, target TEXT NOT NULL,
        version INTEGER NOT NULL, sha256 TEXT NOT NULL, artifact TEXT NOT NULL, kind TEXT NOT NULL,
        status TEXT NOT NULL, reason TEXT, rollout TEXT)""",
    """CREATE TABLE device_results (
        deployment_id INTEGER NOT NULL REFERENCES deployments(id), device_id TEXT NOT NULL, phase TEXT,
        status TEXT NOT NULL, active_version INTEGER, reason TEXT, metrics TEXT)""",
    "CREATE INDEX device_results_by_device ON device_results(device_id)",
]


class FleetStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (v INTEGER NOT NULL)")
        row = self.db.execute("SELECT v FROM schema_version").fetchone()
        current = row["v"] if row else 0
        if not row:
            self.db.execute("INSERT INTO schema_version VALUES (0)")
        for i, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(sql)
                self.db.execute("UPDATE schema_version SET v = ?", (i,))

    def record(self, *, name: str, target: str, version: int, sha256: str, artifact: str, kind: str, status: str,
               reason: str | None, results: list[dict[str, Any]], rollout: dict[str, Any] | None = None) -> int:
        """One deployment and its device results, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT INTO deployments (ts, name, target, version, sha256, artifact, kind, status, reason, rollout)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (time.time(), name, target, version, sha256, artifact, kind, status, reason,
                 json.dumps(rollout) if rollout else None))
            dep = cur.lastrowid
            self.db.executemany(
                "INSERT INTO device_results VALUES (?,?,?,?,?,?,?)",
                [(dep, r["device_id"], r.get("phase"), r["status"], r.get("active_version"), r.get("reason"),
                  json.dumps(r.get("metrics")) if r.get("metrics") else None) for r in results])
        return int(dep)

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

    def close(self) -> None:
        self.db.close()
