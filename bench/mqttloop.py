"""Many paho-mqtt clients driven by one thread: the simulators' shared event loop (bench/fleetsim.py for telemetry,
bench/transfersim.py for transfers).

No thread per device: one thread drives every client of a process through paho's external-loop API (``loop_read``,
``loop_write``, ``loop_misc`` and its socket callbacks) over an epoll selector (``select()`` takes no descriptor above
1023). Connections are opened ``window`` at a time (hundreds of CONNECTs at once on two cores time out); a device
without a CONNACK after CONNACK_TIMEOUT_S has its socket dropped and tries again; a dropped connection is reopened by
the device's own doubling delay (``schedule``).

With ``link_bytes_s`` each device reads its socket no faster than a link of that speed would bring the bytes (the
device says what it took: :meth:`Loop.charge`); the broker's sends to it back up in TCP as over a slow radio link.

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
    dev.fleet._watch(dev, sock)


def _on_socket_close(client, dev, sock) -> None:
    dev.fleet._unwatch(dev)


def _on_register_write(client, dev, sock) -> None:
    dev.fleet._want_write(dev, True)


def _on_unregister_write(client, dev, sock) -> None:
    dev.fleet._want_write(dev, False)


class _Socket:
    """What the loop watches a device's socket for: reading unless its link is paused, writing while paho asks."""

    __slots__ = ("sock", "write", "paused", "mask", "tokens", "at")

    def __init__(self, sock) -> None:
        self.sock, self.write, self.paused, self.mask = sock, False, False, 0
        self.tokens, self.at = 0.0, time.monotonic()


class Loop:
    """One process's devices and their sockets; subclasses add what the devices do."""

    def __init__(self, connect_window: int = 20, link_bytes_s: float | None = None) -> None:
        """``link_bytes_s``: each device's link, in bytes a second, downstream (None: as fast as loopback). A device
        that has taken more than its link carries stops reading its socket until the link has caught up, so the
        broker's TCP sends to it back up as they would over the air; :meth:`charge` counts what it took."""
        self.sel = selectors.DefaultSelector()
        self.window = connect_window
        self.link_bytes_s = link_bytes_s
        self._io: dict = {}  # device -> _Socket
        self._paused: list[tuple[float, int, object]] = []  # (when its link has caught up, order, device)
        self._order = 0
        self.devices: list = []
        self.connecting: set = set()
        self.connect_failures = 0
        self.closing = False
        self._due: list[tuple[float, int]] = []  # (when, index): devices waiting to (re)connect
        self._partial = ""  # a command line not yet ended

    # -- sockets ----------------------------------------------------------------------------------------------
    def _apply(self, dev) -> None:
        io = self._io.get(dev)
        if io is None:
            return
        mask = (0 if io.paused else selectors.EVENT_READ) | (selectors.EVENT_WRITE if io.write else 0)
        if mask == io.mask:
            return
        try:
            if io.mask == 0:
                self.sel.register(io.sock, mask, dev)
            elif mask == 0:
                self.sel.unregister(io.sock)
            else:
                self.sel.modify(io.sock, mask, dev)
        except (KeyError, ValueError, OSError):  # a socket already closed
            pass
        io.mask = mask

    def _watch(self, dev, sock) -> None:
        self._unwatch(dev)
        self._io[dev] = _Socket(sock)
        self._apply(dev)

    def _unwatch(self, dev) -> None:
        io = self._io.pop(dev, None)
        if io is not None and io.mask:
            try:
                self.sel.unregister(io.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _want_write(self, dev, write: bool) -> None:
        io = self._io.get(dev)
        if io is not None:
            io.write = write
            self._apply(dev)

    def charge(self, dev, nbytes: int) -> None:
        """``dev`` has read ``nbytes`` off its link: past what the link carries by now, it pauses until it has."""
        io = self._io.get(dev)
        if self.link_bytes_s is None or io is None:
            return
        now = time.monotonic()
        # a link idle for a while does not bank more than a chunk's worth: bursts stay what a radio gives
        io.tokens = min(io.tokens + (now - io.at) * self.link_bytes_s, 32 * 1024) - nbytes
        io.at = now
        if io.tokens < 0 and not io.paused:
            io.paused = True
            self._apply(dev)
            self._order += 1
            heapq.heappush(self._paused, (now - io.tokens / self.link_bytes_s, self._order, dev))

    def _resume_links(self, now: float) -> None:
        while self._paused and self._paused[0][0] <= now:
            _, _, dev = heapq.heappop(self._paused)
            io = self._io.get(dev)
            if io is not None and io.paused:
                io.paused = False
                self._apply(dev)

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
        if self._paused:
            timeout = max(0.0, min(timeout, self._paused[0][0] - time.monotonic()))
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
        self._resume_links(time.monotonic())
        return lines

    def misc(self, now: float) -> None:
        """Once a second: keep-alives, and connections that never got their CONNACK."""
        for dev in self.devices:
            dev.client.loop_misc()
        self.expire_connects(now)
