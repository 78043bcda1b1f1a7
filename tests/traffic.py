"""Steady traffic for the serving tests: client threads calling an agent's inference API without pause, every
answer's version kept in order per thread, and a way to wait until some number of answers came back."""

from __future__ import annotations

import threading

import numpy as np

from device_agent.client import Client


class SteadyTraffic:
    def __init__(self, socket_path: str, x: np.ndarray | dict, clients: int = 4, timeout: float = 30.0) -> None:
        self.socket_path, self.x, self.timeout = socket_path, x, timeout
        self.seen: list[list[int | None]] = [[] for _ in range(clients)]
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._answered = threading.Condition()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    @property
    def answers(self) -> int:
        return sum(map(len, self.seen))

    def _run(self, i: int) -> None:
        with Client(self.socket_path, timeout=self.timeout) as client:
            while not self._stop.is_set():
                try:
                    version = client.infer(self.x).version
                except Exception as exc:  # noqa: BLE001 - any failure is what the tests count
                    self.failures.append(repr(exc))
                    version = None
                with self._answered:
                    if version is not None:
                        self.seen[i].append(version)
                    self._answered.notify_all()

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` answers in all came back (or a request failed: the test then says which)."""
        with self._answered:
            assert self._answered.wait_for(lambda: self.answers >= n or self.failures, timeout=timeout), self.answers

    def __enter__(self) -> "SteadyTraffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
