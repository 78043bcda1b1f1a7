"""Many paho-mqtt clients driven by one thread: the simulators' shared event loop (bench/fleetsim.py for telemetry,
bench/transfersim.py for transfers).

No thread per device: one thread drives every client of a process through paho's external-loop API (``loop_read``,
``loop_write``, ``loop_misc`` and its socket callbacks) over an epoll selector (``select()`` takes no descriptor above
1023). Connections are opened ``window`` at a time (hundreds of CONNECTs at once on two cores time out); a device
without a CONNACK after CONNACK_TIMEOUT_S has its socket dropped and tries again; a dropped connection is reopened by
the device's own doubling delay (``schedule``).

A device is any object with ``client`` (a paho client made with ``userdata`` the device and wired by :meth:`Loop.wire`),
``index`` (its place in ``Loop.devices``), ``fleet`` (the loop), ``connected``, ``connecting_since`` and ``delay``.
"""

from __future__ import annotations

import heapq
import os
import random
import resource
import selectors
import time

#: seconds a connection may wait for its CONNACK before its socket is dropped and it tries again
CONNACK_TIMEOUT_S = 20.0
#: the longest delay between a device's reconnection attempts
MAX_DELAY_S = 8.0


def raise_file_limit() -> None:
    """A socket per device, and paho's own: as many descriptors as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _on_socket_open(client, dev, sock) -> None:
    dev.fleet.sel.register(sock, selectors.EVENT_READ, dev)


def _on_socket_close(client, dev, sock) -> None:
    try:
        dev.fleet.sel.unregister(sock)
    except (KeyError, ValueError):
        pass


def _on_register_write(client, dev, sock) -> None:
    dev.fleet.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)


def _on_unregister_write(client, dev, sock) -> None:
    try:
        dev.fleet.sel.modify(sock, selectors.EVENT_READ, dev)
    except (KeyError, ValueError):
        pass


class Loop:
    """One process's devices and their sockets; subclasses add what the devices do."""

    def __init__(self, connect_window: int = 20) -> None:
        self.sel = selectors.DefaultSelector()
        self.window = connect_window
        self.devices: list = []
        self.connecting: set = set()
        self.connect_failures = 0
        self.closing = False
        self._due: list[tuple[float, int]] = []  # (when, index): devices waiting to (re)connect
        self._partial = ""  # a command line not yet ended

    @staticmethod
    def wire(client) -> None:
        """Have ``client``'s sockets watched by its device's loop."""
        client.on_socket_open, client.on_socket_close = _on_socket_open, _on_socket_close
        client.on_socket_register_write, client.on_socket_unregister_write = _on_register_write, _on_unregister_write

    def schedule(self, dev, delay: float) -> None:
        heapq.heappush(self._due, (time.monotonic() + delay, dev.index))

    def backoff(self, dev) -> None:
        """Try ``dev`` again after its delay (jittered), doubling the next one."""
        self.schedule(dev, dev.delay * random.uniform(0.5, 1.5))
        dev.delay = min(dev.delay * 2, MAX_DELAY_S)

    def connect_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now and len(self.connecting) < self.window:
            dev = self.devices[heapq.heappop(self._due)[1]]
            if dev.connected or dev in self.connecting or not self.may_connect(dev):
                continue
            try:
                dev.client.reconnect()
            except OSError:  # refused: the broker is down (restarting)
                self.connect_failures += 1
                self.backoff(dev)
                continue
            dev.connecting_since = now
            self.connecting.add(dev)

    def may_connect(self, dev) -> bool:
        """Whether ``dev`` is to connect now (a device that has dropped off waits)."""
        return True

    def expire_connects(self, now: float) -> None:
        for dev in [d for d in self.connecting if d.connecting_since and now - d.connecting_since > CONNACK_TIMEOUT_S]:
            self.connecting.discard(dev)  # no CONNACK in time: drop the socket and try again
            dev.client._sock_close()  # noqa: SLF001 - paho offers no public way to drop a socket without a DISCONNECT
            self.schedule(dev, dev.delay)

    @property
    def connected(self) -> int:
        return sum(d.connected for d in self.devices)

    def watch_commands(self, fd: int) -> None:
        """Take command lines from ``fd`` (a worker's stdin): :meth:`pump` returns them."""
        self.sel.register(fd, selectors.EVENT_READ, None)

    def pump(self, timeout: float) -> list[str]:
        """One round of network events; the command lines that came meanwhile (``eof`` at their end)."""
        lines = []
        for key, mask in self.sel.select(timeout):
            if key.data is None:
                data = os.read(key.fd, 4096)
                if not data:
                    self.sel.unregister(key.fd)
                    lines.append("eof")
                    continue
                *complete, self._partial = (self._partial + data.decode()).split("\n")
                lines += [line.strip() for line in complete if line.strip()]
                continue
            client = key.data.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        return lines

    def misc(self, now: float) -> None:
        """Once a second: keep-alives, and connections that never got their CONNACK."""
        for dev in self.devices:
            dev.client.loop_misc()
        self.expire_connects(now)
