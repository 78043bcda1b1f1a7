"""The agent's own resident memory and CPU share, read from the kernel (``/proc/self/statm``, ``os.times``).

``psutil`` gives the same figures for ~1 MB of resident memory in every agent; it stays the fallback where there
is no ``/proc`` (macOS).
"""

from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """This process's resident set, MiB."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss / 2**20


class CpuShare:
    """CPU time this process used per wall second since the previous call, in percent (100 = one core busy;
    several threads can take it past 100), as ``psutil.Process.cpu_percent(interval=None)`` counts it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        t = os.times()
        return time.monotonic(), t.user + t.system

    def percent(self) -> float:
        with self._lock:
            (wall0, cpu0), now = self._last, self._now()
            self._last = now
        wall = now[0] - wall0
        return 0.0 if wall <= 0 else max(0.0, (now[1] - cpu0) / wall * 100)
