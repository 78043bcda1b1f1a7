"""A candidate model run off the request path on sampled live requests, compared with the active model's answers.

The inference API hands each answered request to :meth:`ShadowRunner.offer` after the answer is written; a share
``sample`` of them is queued (at most ``QUEUE`` waiting; beyond, dropped and counted) for one worker thread that
runs the candidate on the same feeds and compares: the same top-1 class for a classifier, else the max and mean
absolute difference of the first outputs. The worker never delays an answer: it runs at the lowest scheduling
priority (``nice 19`` for its thread, on Linux), on one intra-op thread, and after each run of ``t`` it takes no
new request for ``t * (1 - max_cpu) / max_cpu`` (requests offered meanwhile are dropped and counted), so its runs
take at most ``max_cpu`` of one core.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import numpy as np

from .drift import top1_classes
from .quality import BUCKETS_MS, LiveAccuracy, Shadow, ShadowStats
from .runtimes import Session

log = logging.getLogger(__name__)

QUEUE = 4


def _bucket(ms: float) -> int:
    return bisect_left(BUCKETS_MS, ms)  # the first bound >= ms; len(BUCKETS_MS) is +Inf


def _lower_priority() -> None:
    """This thread at the lowest priority (Linux keeps a nice value per thread); elsewhere nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class ShadowRunner:
    def __init__(self, session: Session, version: int, active: int | None, config: Shadow,
                 accuracy: LiveAccuracy | None = None, chance: Callable[[], float] = random.random,
                 bench: dict[str, Any] | None = None) -> None:
        self.session, self.version, self.config = session, version, config
        self.stats = ShadowStats(candidate=version, active=active, sample=config.sample, bench=bench)
        self.accuracy, self._chance = accuracy, chance
        self._queue: queue.Queue[tuple[str, dict, list, float] | None] = queue.Queue(QUEUE)
        self._lock = threading.Lock()
        self._rest_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name=f"shadow-v{version}")
        self._thread.start()

    def offer(self, rid: str, feeds: dict[str, np.ndarray], outputs: list, active_ms: float,
              active: int | None) -> None:
        """An answered request (called on its thread, after the answer went out): maybe queued for the
        candidate. Cheap and never raises."""
        if self._stop.is_set() or self._chance() >= self.config.sample:
            return
        with self._lock:
            self.stats.offered += 1
            if active != self.stats.active:  # answered by a model swapped in since: compare with that one
                self.stats.active = active
            if time.monotonic() < self._rest_until:
                self.stats.dropped += 1
                return
        try:
            self._queue.put_nowait((rid, feeds, outputs, active_ms))
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1

    def _work(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            rid, feeds, outputs, active_ms = item
            t0 = time.perf_counter()
            try:
                mine = self.session.run(feeds)
            except Exception as exc:  # noqa: BLE001 - a candidate that fails is counted, never more
                log.debug("shadow v%s failed on a request: %s", self.version, exc)
                with self._lock:
                    self.stats.errors += 1
                continue
            ms = (time.perf_counter() - t0) * 1e3
            self._compare(rid, outputs, mine, active_ms, ms)
            share = self.config.max_cpu
            rest = ms / 1e3 * (1 - share) / share
            with self._lock:
                self._rest_until = time.monotonic() + rest
            # the rest is taken here, and what was queued during the run is dropped: queued requests run back to
            # back would take the core for as long as the queue is deep (2.4x max_cpu, measured)
            if self._stop.wait(rest):
                return
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._stop.set()
                return
            with self._lock:
                self.stats.dropped += 1

    def _compare(self, rid: str, theirs: list, mine: list, active_ms: float, ms: float) -> None:
        a, b = (np.asarray(theirs[0]) if theirs else None), (np.asarray(mine[0]) if mine else None)
        same_shape = a is not None and b is not None and a.shape == b.shape
        ta, tb = (top1_classes(a), top1_classes(b)) if same_shape else (None, None)
        if same_shape:
            with np.errstate(all="ignore"):
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            finite = bool(np.isfinite(diff).all()) and diff.size > 0
        with self._lock:
            s = self.stats
            if not same_shape or not finite:
                s.errors += 1
                return
            s.compared += 1
            s.max_distance = max(s.max_distance, float(diff.max()))
            s.sum_distance += float(diff.mean())
            if ta is None:
                s.top1 = False
            elif s.top1:
                s.agree += int(bool((ta == tb).all()))
            s.active_ms[_bucket(active_ms)] += 1
            s.candidate_ms[_bucket(ms)] += 1
        if self.accuracy is not None and tb is not None and len(tb) == 1:
            self.accuracy.also(rid, self.version, int(tb[0]))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.stats.to_dict()

    def stop(self) -> None:
        """No more runs: what waits is dropped, a run under way finishes, the worker ends."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(None)  # wakes a waiting worker; one that is running sees the flag after
        except queue.Full:  # offers that passed the flag just before it was set: the worker stops at the next
            pass
        self._thread.join(timeout=2)  # a run under way ends on its own (a nice-19 run on a busy core can be long)

    @property
    def idle(self) -> bool:
        return self._queue.empty()
