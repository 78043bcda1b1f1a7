"""Download a payload over HTTP(S) with Range requests, into the same resumable Download as MQTT chunks:
each chunk is fetched, written, fsynced and recorded, so an interrupted download resumes where it was."""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .download import Download

log = logging.getLogger(__name__)


class HttpFetch(threading.Thread):
    """Fetches the missing chunks of ``download`` from ``url``; calls ``done(error_or_None)`` at the end."""

    def __init__(self, url: str, download: Download, done: Callable[[str | None], None],
                 ca_file: Path | None = None, retries: int = 8, timeout_s: float = 30.0) -> None:
        super().__init__(daemon=True, name="http-fetch")
        self.url, self.dl, self.done = url, download, done
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.retries, self.timeout_s = retries, timeout_s
        self.stop = threading.Event()
        self.requests = 0

    def _get(self, start: int, end: int) -> bytes:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
        self.requests += 1
        with urllib.request.urlopen(req, timeout=self.timeout_s, context=self.context) as resp:
            if resp.status != 206:
                raise OSError(f"server answered {resp.status} to a Range request (needs 206 Partial Content)")
            return resp.read()

    def run(self) -> None:
        failures = 0
        missing = self.dl.missing()
        while missing and not self.stop.is_set():
            index = missing[0]
            start = index * self.dl.chunk_size
            end = start + self.dl.expected_size(index) - 1
            try:
                data = self._get(start, end)
                if len(data) != end - start + 1:
                    raise OSError(f"short read: {len(data)} of {end - start + 1} bytes")
            except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
                failures += 1
                if failures > self.retries:
                    return self.done(f"HTTP download from {self.url} failed: {exc}")
                time.sleep(min(0.2 * 2 ** failures, 10))
                continue
            failures = 0
            self.dl.write(index, data)
            self.dl.checkpoint()
            missing = missing[1:]
        self.done(None if not self.stop.is_set() else "stopped")
