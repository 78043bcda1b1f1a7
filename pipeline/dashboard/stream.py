"""``/api/stream``: server-sent events, one ``change`` whenever the store commits, for any number of clients.

One watcher polls the store's ``data_version`` (on one connection, in one worker thread: the counter is per
connection) and wakes every client; a client is a coroutine waiting on its own ``asyncio.Event``, not a
thread with a poller of its own. A client gets a ``change`` at once (the initial state), then one after each
commit, and a comment every 15 s when nothing changed, so that proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from ..fleet.store import FleetStore

log = logging.getLogger(__name__)
KEEP_ALIVE_S = 15.0


def change_event() -> bytes:
    return f"event: change\ndata: {json.dumps({'ts': time.time()})}\n\n".encode()


class ChangeFeed:
    def __init__(self, store: FleetStore, poll_s: float = 0.5, keep_alive_s: float = KEEP_ALIVE_S) -> None:
        self.store, self.poll_s, self.keep_alive_s = store, poll_s, keep_alive_s
        #: commits seen since the watcher started
        self.changes = 0
        self._clients: set[asyncio.Event] = set()
        self._closed = False
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="dashboard-watch")

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def watch(self) -> None:
        """The one watcher: runs in the server's event loop until cancelled."""
        loop = asyncio.get_running_loop()
        seen = None
        try:
            while not self._closed:
                try:
                    version = await loop.run_in_executor(self._reader, self.store.data_version)
                except Exception as exc:  # a store gone for a moment: tried again at the next poll
                    log.warning("dashboard: cannot read the store's data_version: %s", exc)
                else:
                    if seen is not None and version != seen:
                        self.changes += 1
                        self._wake()
                    seen = version
                await asyncio.sleep(self.poll_s)
        finally:
            self._reader.shutdown(wait=False)

    def _wake(self) -> None:
        for event in self._clients:
            event.set()

    def close(self) -> None:
        """Ends every client's stream (call it in the server's loop): a server that stops waits for none."""
        self._closed = True
        self._wake()

    async def events(self) -> AsyncIterator[bytes]:
        """One client's stream, until the feed closes or the client goes (Starlette cancels it)."""
        wake = asyncio.Event()
        self._clients.add(wake)
        try:
            yield change_event()
            while not self._closed:
                try:
                    await asyncio.wait_for(wake.wait(), self.keep_alive_s)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                wake.clear()
                if not self._closed:
                    yield change_event()
        finally:
            self._clients.discard(wake)
