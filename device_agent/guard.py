"""Two guards at the agent's door: against a poison message, and against a flood of junk.

**Poison.** Every message is handled inside a boundary that catches what escapes, so a Python error never
takes the agent down. What remains (a segfault in a runtime, the kernel's OOM killer) kills the process with
the message unacknowledged, and the broker hands it back after the restart: a crash loop. So the digest of
the message being handled is written to ``inflight`` before handling and cleared after; a restarted agent
that finds a digest there counts one death for it (``poison.json``). A message that was in flight at
``DROP_AFTER`` deaths is dropped with an event the next time it comes. One death is not enough: a power cut
during a legitimate activation must not make the update's last chunk poison.

The mark is written with ``pwrite`` into an open file, without fsync: it must survive the process, not the
machine, and it costs microseconds per message.

**Flood.** Events answering unauthenticated input are rate-limited (a token bucket); what the bucket
swallows is counted and reported with the next event that gets through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .storage import atomic_write_json

log = logging.getLogger(__name__)

#: deaths with the same message in flight before it is dropped
DROP_AFTER = 2
#: digests remembered (oldest forgotten first)
REMEMBER = 64
_MARK_SIZE = 64  # a hex sha256


def digest(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode("utf-8", "replace") + b"\0" + payload).hexdigest()


class PoisonGuard:
    def __init__(self, root: Path) -> None:
        self._ledger_path = root / "poison.json"
        self._ledger: dict[str, int] = self._read_ledger()
        mark_path = root / "inflight"
        self._fd = os.open(mark_path, os.O_RDWR | os.O_CREAT, 0o600)
        left = os.pread(self._fd, _MARK_SIZE, 0).decode("ascii", "replace").strip("\0 \n")
        if len(left) == _MARK_SIZE:  # the previous process died handling this message
            self._ledger[left] = self._ledger.get(left, 0) + 1
            while len(self._ledger) > REMEMBER:
                self._ledger.pop(next(iter(self._ledger)))
            atomic_write_json(self._ledger_path, self._ledger)
            log.warning("the previous run died while handling a message (%s..., %d death(s))", left[:12],
                        self._ledger[left])
        self._clear()

    def _read_ledger(self) -> dict[str, int]:
        try:
            data = json.loads(self._ledger_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}

    def deaths(self, topic: str, payload: bytes) -> int:
        return self._ledger.get(digest(topic, payload), 0)

    def before(self, topic: str, payload: bytes) -> bool:
        """Mark the message in flight; False (and no mark) when it is poison: drop it instead of handling it."""
        key = digest(topic, payload)
        if self._ledger.get(key, 0) >= DROP_AFTER:
            return False
        os.pwrite(self._fd, key.encode("ascii"), 0)
        return True

    def after(self) -> None:
        self._clear()

    def _clear(self) -> None:
        os.pwrite(self._fd, b"\0" * _MARK_SIZE, 0)

    def close(self) -> None:
        os.close(self._fd)


class RateLimit:
    """A token bucket: ``burst`` at once, then one every ``every_s`` seconds."""

    def __init__(self, burst: int = 10, every_s: float = 6.0, clock=time.monotonic) -> None:
        self.burst, self.every_s, self._clock = burst, every_s, clock
        self._tokens, self._at = float(burst), clock()
        self.suppressed = 0  # since the last event that got through

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) / self.every_s)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False


class StartBackoff:
    """An increasing delay before connecting when the agent keeps dying soon after it starts, whatever
    restarts it (systemd of any version, the background supervisor, a shell loop).

    Each start is recorded in ``starts.json`` and a clean stop clears the record; a start that finds
    ``FREE_STARTS`` or more unclean starts within ``WINDOW_S`` waits ``BASE_S * 2**k`` seconds (at most
    ``MAX_S``) before going on. A deliberate delay, not synchronisation: the broker and any device service stay
    untouched while the agent rests.
    """

    FREE_STARTS = 3
    WINDOW_S = 600.0
    BASE_S = 5.0
    MAX_S = 300.0

    def __init__(self, root: Path, clock=time.time) -> None:
        self.path, self._clock = root / "starts.json", clock

    def _starts(self) -> list[float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [t for t in data if isinstance(t, (int, float))] if isinstance(data, list) else []

    def record_start(self) -> float:
        """Record this start; return how long to wait before connecting."""
        now = self._clock()
        recent = [t for t in self._starts() if now - self.WINDOW_S <= t <= now][-20:]
        atomic_write_json(self.path, [*recent, now])
        unclean = len(recent)
        if unclean < self.FREE_STARTS:
            return 0.0
        return min(self.MAX_S, self.BASE_S * 2 ** (unclean - self.FREE_STARTS))

    def record_clean_stop(self) -> None:
        self.path.unlink(missing_ok=True)
