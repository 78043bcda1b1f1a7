"""The dashboard's live stream on Starlette: any number of clients share one watcher of the store, and no client
costs a thread or a connection to SQLite of its own."""

from __future__ import annotations

import http.client
import threading
import time

from pipeline.dashboard import Dashboard
from pipeline.fleet import FleetStore


def open_stream(dash: Dashboard) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = dash.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/api/stream")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline() == b"event: change\n"  # the initial state
    resp.readline(), resp.readline()
    return conn, resp


def test_many_stream_clients_share_one_watcher_and_no_thread_each(fleet_db):
    db = fleet_db
    writer = FleetStore(db)
    with Dashboard(db, port=0, stream_poll_s=0.05) as dash:
        first = open_stream(dash)
        threads_with_one = threading.active_count()
        connections_with_one = len(dash.store._connections.all())
        clients = [first] + [open_stream(dash) for _ in range(19)]
        assert dash.feed.clients == 20
        assert threading.active_count() == threads_with_one  # before: one thread (and one poller) per client
        assert len(dash.store._connections.all()) == connections_with_one
        writer.ingest([("d1", "online", {"online": True})])  # another connection commits: all 20 hear it once
        for _, resp in clients:
            assert resp.readline() == b"event: change\n"
        assert dash.feed.changes == 1
        started = time.monotonic()
    # stopping ends the open streams instead of waiting on them
    assert time.monotonic() - started < 5
    for conn, resp in clients:
        rest = resp.read()  # the rest of the change event, then the end of the stream (no hang)
        assert rest.startswith(b"data: ") and rest.endswith(b"\n\n") and b"event:" not in rest
        conn.close()
    writer.close()


def test_a_stream_says_something_while_nothing_changes_and_head_does_not_hang(tmp_path):
    db = tmp_path / "fleet.db"
    with Dashboard(db, port=0, stream_poll_s=0.05) as dash:
        dash.feed.keep_alive_s = 0.2
        conn, resp = open_stream(dash)
        assert resp.readline() == b": keep-alive\n"
        conn.close()
        host, port = dash.server_address
        head = http.client.HTTPConnection(host, port, timeout=10)
        head.request("HEAD", "/api/stream")
        r = head.getresponse()
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream" and r.read() == b""
        head.close()
        deadline = time.monotonic() + 5
        while dash.feed.clients and time.monotonic() < deadline:  # a client that left is forgotten
            time.sleep(0.05)
        assert dash.feed.clients == 0
