"""The fleet store across threads: one connection per thread, migrations once, progress queued off the network
thread and written by the store's own writer."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from pipeline.fleet import FleetStore
from pipeline.fleet.store import MIGRATIONS


@pytest.fixture
def store(tmp_path):
    s = FleetStore(tmp_path / "fleet.db")
    yield s
    s.close()


def count_migrations(monkeypatch) -> list[str]:
    runs: list[str] = []
    migrate = FleetStore._migrate

    def counted(self, con):
        runs.append(threading.current_thread().name)
        migrate(self, con)

    monkeypatch.setattr(FleetStore, "_migrate", counted)
    return runs


def test_each_thread_has_its_own_connection_kept_for_the_store_s_life(store):
    seen: dict[str, int] = {}

    def use(name: str) -> None:
        seen[name] = id(store.db)
        assert store.db is store.db  # the same one each time on this thread
        store.count("devices")

    threads = [threading.Thread(target=use, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen.values()) | {id(store.db)}) == 5
    connections = store._connections.all()
    assert len(connections) == 5
    store.close()
    for con in connections:  # every thread's connection closed with the store
        with pytest.raises(sqlite3.ProgrammingError):
            con.execute("SELECT 1")


def test_migrations_run_once_per_database_however_often_it_is_opened(tmp_path, monkeypatch):
    runs = count_migrations(monkeypatch)
    db = tmp_path / "fleet.db"
    FleetStore(db).close()
    assert len(runs) == 1
    for _ in range(5):  # reopened: one read of schema_version, no migration, no write lock
        FleetStore(db).close()
    shared = FleetStore(db)
    try:
        threads = [threading.Thread(target=shared.count, args=("devices",)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        shared.close()
    assert len(runs) == 1
    con = sqlite3.connect(db)
    assert con.execute("SELECT v FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    con.close()


def test_progress_from_another_thread_lands_in_order_without_reopening_the_store(store, monkeypatch):
    runs = count_migrations(monkeypatch)
    opened: list[str] = []
    connect = FleetStore._connect

    def counted(self):
        opened.append(threading.current_thread().name)
        return connect(self)

    monkeypatch.setattr(FleetStore, "_connect", counted)
    dep = store.start(name="m", target="rpi4", version=2, sha256="0" * 64, artifact="a", kind="deploy",
                      devices=["d1", "d2"])
    states = ["downloading", "verifying", "installing", "testing", "activated"]
    callers: list[str] = []
    with store.progress_queue(dep) as updates:
        def network_thread() -> None:  # what paho's loop does: report, and go on at once
            callers.append(threading.current_thread().name)
            for s in states:
                updates.put("d1", s)
            updates.put("d2", "downloading")

        t = threading.Thread(target=network_thread, name="paho-net")
        t.start()
        t.join()
    # leaving the with wrote everything queued, in order; the writer thread opened one connection, once
    assert updates.written == len(states) + 1
    assert {r["device_id"]: r["status"] for r in store.results(dep)} == {"d1": "activated", "d2": "downloading"}
    assert callers == ["paho-net"] and "paho-net" not in opened
    assert opened == [f"fleet-progress-{dep}"] and runs == []


def test_a_progress_write_that_fails_is_logged_and_the_writer_goes_on(store, caplog):
    dep = store.start(name="m", target="rpi4", version=2, sha256="0" * 64, artifact="a", kind="deploy",
                      devices=["d1"])
    calls = {"n": 0}
    progress = store.progress

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        progress(*a)

    store.progress = flaky
    with store.progress_queue(dep) as updates:
        updates.put("d1", "downloading")
        updates.put("d1", "activated")
    assert updates.written == 1 and store.results(dep)[0]["status"] == "activated"
    assert "not stored: database is locked" in caplog.text
