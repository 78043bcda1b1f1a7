"""Simulated devices speaking the agent's protocol over real MQTT connections, many per process.

    .venv/bin/python bench/fleetsim.py --broker 127.0.0.1:1883 --devices 250 [--first 0] [--seconds 60]
                                       [--interval 1] [--out result.json]

Each device is its own paho-mqtt client and broker session (client id = device id), as a device agent is: MQTT 5,
clean start, a retained Last Will ``offline`` on ``<prefix>/v1/<device>/online``; on every (re)connection it
subscribes to its ``job`` and ``cmd`` topics and publishes ``online`` and a ``Status`` (both retained), then a
``Metrics`` every ``--interval`` seconds, all QoS 1 and built by ``device_agent.protocol`` with the device's
``boot`` and ``seq`` and a ``ts`` of its own per message. No thread per device: one thread drives every client of
the process (bench/mqttloop.py).

Connections are opened ``--connect-window`` at a time (hundreds of CONNECTs at once on two cores time out). A
dropped connection (a broker restart) is reopened with jittered, doubling delays; paho keeps every QoS 1 message not
yet acknowledged (publishes made while disconnected too) and sends it again, DUP set, once the broker has answered
the CONNECT. That holds with clean start as well: clean start drops the broker's session (subscriptions, messages
queued for the device), never the client's outgoing messages, so a message is counted once however often it went
out. A message is *acknowledged* when its PUBACK came back with a success code; a failure code counts it
``refused``. One that says no subscription matched it (MQTT 5's reason 16, a success code: a restarted Mosquitto
forgets shared subscriptions until the ingesters subscribe again) is published again with the agent's policy for
telemetry (``device_agent.mqtt``, ``until_routed``: backing off from ~1 s to ~30 s) until a subscriber takes it, or
counted ``unrouted`` where the agent would give up.

A worker reads commands on stdin (``go``: start publishing; ``stop``: stop publishing now; end of input: stop and
exit) and writes one JSON line of progress a second on stdout (``connected``, ``sent``, ``acked``...). After
``--seconds`` of publishing it waits until every metrics message is acknowledged (at most ``--drain-s``), says
``offline`` as an agent stopping does, and writes ``--out``: per device, every metrics message's ``[seq, ts,
outcome, publishes]`` (outcome 0 sent only, 1 acknowledged, 2 acknowledged but routed to nobody and given up, 3
refused). ``SimFleet`` runs such workers and merges what they report.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(1, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import heapq  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402

from device_agent import mqtt as agent_mqtt  # noqa: E402
from device_agent.protocol import Leaf, Metrics, Status, encode, topic  # noqa: E402
from mqttloop import Loop, raise_file_limit  # noqa: E402

SENT, ACKED, UNROUTED, REFUSED = 0, 1, 2, 3
#: the agent's policy for telemetry the broker routed to nobody (device_agent.mqtt, ``until_routed``): published
#: again after ~1 s, doubling to ~30 s (x0.75-1.25), at most MAX_UNROUTED waiting, none older than the max age
NO_SUBSCRIBERS = agent_mqtt.NO_MATCHING_SUBSCRIBERS
RETRY_FIRST_S, RETRY_MAX_S = agent_mqtt._RETRY_FIRST_S, agent_mqtt._RETRY_MAX_S  # noqa: SLF001 - one policy
MAX_UNROUTED, UNROUTED_MAX_AGE_S = agent_mqtt.MAX_UNROUTED, agent_mqtt.UNROUTED_MAX_AGE_S


class SimDevice:
    """One device: its MQTT client and what it sent, and what of it the broker acknowledged."""

    def __init__(self, fleet: "Worker", device_id: str, index: int) -> None:
        self.fleet, self.device_id, self.index = fleet, device_id, index
        self.boot, self.seq, self.t0 = 1, 0, time.time()
        self.metrics: dict[int, list] = {}  # seq -> [seq, ts, outcome, publishes]
        self.mids: dict[int, tuple[str, int]] = {}  # mid of a message in flight -> (leaf, seq)
        self.unsettled: dict[int, tuple[bytes, float]] = {}  # seq -> (payload, first published): not yet routed
        self.waiting = 0  # of them, waiting for another try
        self.last_ts = 0.0
        self.connected = False
        self.connecting_since: float | None = None
        self.delay = 0.5  # the next reconnection's delay, doubled on every failure
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5,
                                      userdata=self)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        c.will_set(self.topic(Leaf.ONLINE), b"offline", qos=1, retain=True)
        c.on_connect, c.on_disconnect, c.on_publish = _on_connect, _on_disconnect, _on_publish
        fleet.wire(c)
        # clean start on every connection, no session expiry: what device_agent.mqtt.MqttLink asks for an agent
        c.connect_async(fleet.host, fleet.port, keepalive=60, clean_start=True)

    def topic(self, leaf: Leaf) -> str:
        return topic(self.fleet.prefix, self.device_id, leaf)

    def publish(self, leaf: Leaf, payload: bytes, retain: bool = False, seq: int = 0) -> None:
        info = self.client.publish(self.topic(leaf), payload, qos=1, retain=retain)
        self.mids[info.mid] = (leaf.value, seq)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send_status(self) -> None:
        s = Status(self.device_id, "activated", "rpi4", active_version=1, active_slot="a", agent_version="fleetsim",
                   boot=self.boot, seq=self.next_seq())
        self.publish(Leaf.STATUS, encode(s), retain=True)

    def send_metrics(self) -> None:
        ts = round(time.time(), 3)
        ts = ts if ts > self.last_ts else round(self.last_ts + 0.001, 3)  # distinct per message: (device_id, ts)
        self.last_ts = ts
        seq = self.next_seq()
        r = random.Random(seq * 7919 + self.index)
        p50 = 4.0 + r.random()
        m = Metrics(self.device_id, 1, p50, p50 * 1.4, 60.0 + r.random() * 5, 10, True, latency_ms_p99=p50 * 1.8,
                    throughput_ips=1000 / p50, cpu_percent=20 + r.random() * 10, slot="a",
                    uptime_s=round(time.time() - self.t0, 1), state="activated", ts=ts, boot=self.boot, seq=seq)
        self.metrics[seq] = [seq, ts, SENT, 1]
        payload = encode(m)
        self.unsettled[seq] = (payload, time.monotonic())
        self.publish(Leaf.METRICS, payload, seq=seq)
        self.fleet.sent += 1

    def republish(self, seq: int) -> None:
        """A metrics message the broker routed to nobody, again (the agent's ``until_routed``)."""
        self.waiting -= 1
        self.metrics[seq][3] += 1
        self.fleet.retried += 1
        self.publish(Leaf.METRICS, self.unsettled[seq][0], seq=seq)

    def unrouted(self, seq: int) -> None:
        """The broker acknowledged ``seq`` with "no matching subscribers": another try, as the agent would."""
        w = self.fleet
        w.unrouted_acks += 1
        first = self.unsettled[seq][1]
        if time.monotonic() - first > UNROUTED_MAX_AGE_S or self.waiting >= MAX_UNROUTED:
            self.settle(seq, UNROUTED)  # given up (the agent drops the oldest; here every one waits as long)
            return
        tries = self.metrics[seq][3] - 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** tries) * random.uniform(0.75, 1.25)
        self.waiting += 1
        heapq.heappush(w.retries, (time.monotonic() + delay, self.index, seq))

    def settle(self, seq: int, outcome: int) -> None:
        self.metrics[seq][2] = outcome
        self.unsettled.pop(seq, None)
        w = self.fleet
        if outcome == REFUSED:
            w.refused += 1
        else:
            w.acked += 1
            w.given_up += outcome == UNROUTED


def _on_connect(client, dev: SimDevice, flags, reason_code, properties) -> None:
    w = dev.fleet
    w.connecting.discard(dev)
    dev.connecting_since = None
    if reason_code.is_failure:
        w.refused_connects += 1
        client.disconnect()
        return
    dev.connected, dev.delay = True, 0.5
    w.connects += 1
    client.subscribe([(dev.topic(Leaf.JOB), 1), (dev.topic(Leaf.CMD), 1)])
    dev.publish(Leaf.ONLINE, b"online", retain=True)
    dev.send_status()


def _on_disconnect(client, dev: SimDevice, flags, reason_code, properties) -> None:
    w = dev.fleet
    w.connecting.discard(dev)
    if dev.connected and not w.closing:
        w.drops += 1
    dev.connected, dev.connecting_since = False, None
    if not w.closing:
        w.backoff(dev)


def _on_publish(client, dev: SimDevice, mid, reason_code, properties) -> None:
    leaf, seq = dev.mids.pop(mid, (None, 0))
    if leaf != Leaf.METRICS.value:
        return
    if reason_code.is_failure:
        dev.settle(seq, REFUSED)
    elif reason_code.value == NO_SUBSCRIBERS:
        dev.unrouted(seq)
    else:
        dev.settle(seq, ACKED)


class Worker(Loop):
    """One process's devices, driven by one thread."""

    def __init__(self, host: str, port: int, devices: list[str], interval: float, seconds: float,
                 prefix: str = "edgefleet", connect_window: int = 20, drain_s: float = 120.0) -> None:
        super().__init__(connect_window)
        self.host, self.port, self.prefix = host, port, prefix
        self.interval, self.seconds, self.drain_s = interval, seconds, drain_s
        self.sent = self.acked = self.refused = self.connects = self.drops = self.refused_connects = 0
        self.unrouted_acks = self.retried = self.given_up = 0  # PUBACKs "no matching subscribers", tries again
        self.retries: list[tuple[float, int, int]] = []  # (when, device index, seq): unrouted, to publish again
        self.devices = [SimDevice(self, d, i) for i, d in enumerate(devices)]
        for dev in self.devices:
            self.schedule(dev, 0.0)

    def unacked(self) -> int:
        return self.sent - self.acked - self.refused

    def progress(self, phase: str) -> dict:
        return {"phase": phase, "connected": self.connected, "sent": self.sent, "acked": self.acked,
                "refused": self.refused, "unrouted_acks": self.unrouted_acks, "retried": self.retried,
                "given_up": self.given_up, "connects": self.connects, "drops": self.drops,
                "connect_failures": self.connect_failures, "t": time.time()}

    def run(self, commands: int | None = None, report=print) -> dict:
        """Connect, wait for ``go`` (on ``commands``, a descriptor; None: go at once), publish, drain, go offline."""
        if commands is not None:
            self.watch_commands(commands)
        phase, started, next_misc, next_report = "connecting", None, 0.0, 0.0
        due: list[tuple[float, int]] = []  # (when, index): the next metrics message of each device
        end_of_drain = float("inf")
        while True:
            now = time.monotonic()
            timeout = min([0.05] + ([max(0.0, due[0][0] - now)] if due else []))
            for cmd in self.pump(timeout):
                if cmd == "go" and phase == "connecting":
                    phase, started = "publishing", time.monotonic()
                    due = [(started + self.interval * i / len(self.devices), i) for i in range(len(self.devices))]
                    heapq.heapify(due)
                elif cmd in ("stop", "eof") and phase in ("connecting", "publishing"):
                    phase, end_of_drain = "draining", time.monotonic() + self.drain_s
                    if cmd == "eof":
                        end_of_drain = 0.0
            if commands is None and phase == "connecting" and self.connected == len(self.devices):
                phase, started = "publishing", time.monotonic()
                due = [(started + self.interval * i / len(self.devices), i) for i in range(len(self.devices))]
                heapq.heapify(due)
            now = time.monotonic()
            if phase == "publishing":
                end = started + self.seconds  # each device sends seconds / interval messages, the last before end
                while due and due[0][0] <= now and due[0][0] < end:
                    when, i = heapq.heappop(due)
                    self.devices[i].send_metrics()
                    heapq.heappush(due, (when + self.interval, i))
                if due[0][0] >= end:
                    phase, end_of_drain = "draining", now + self.drain_s
            while self.retries and self.retries[0][0] <= now:
                _, i, seq = heapq.heappop(self.retries)
                self.devices[i].republish(seq)
            if phase == "draining" and (self.unacked() == 0 or now >= end_of_drain):
                break
            self.connect_due(now)
            if now >= next_misc:
                next_misc = now + 1.0
                self.misc(now)
            if now >= next_report:
                next_report = now + 1.0
                report(json.dumps(self.progress(phase)))
        self._go_offline()
        report(json.dumps(self.progress("done")))
        return self.result()

    def _go_offline(self, timeout: float = 10.0) -> None:
        """As an agent stopping: ``offline`` (retained), then DISCONNECT, once every device's queue is empty."""
        self.closing = True
        for dev in self.devices:
            if dev.connected:
                dev.publish(Leaf.ONLINE, b"offline", retain=True)
        deadline = time.monotonic() + timeout
        while any(d.mids for d in self.devices if d.connected) and time.monotonic() < deadline:
            self.pump(0.05)
        for dev in self.devices:
            if dev.connected:
                dev.client.disconnect()
        deadline = time.monotonic() + timeout
        while any(d.connected for d in self.devices) and time.monotonic() < deadline:
            self.pump(0.05)

    def result(self) -> dict:
        return {"counts": self.progress("done"),
                "devices": {d.device_id: {"boot": d.boot, "metrics": list(d.metrics.values())}
                            for d in self.devices}}


class SimFleet:
    """``devices`` simulated devices in ``workers`` processes of this module (``--wait-go``), seen from the parent:
    ``start()``, ``connected`` (observable), ``go()``, ``totals()`` while they run, ``wait()`` for the merged result."""

    def __init__(self, host: str, port: int, devices: int, workers: int, seconds: float, interval: float,
                 workdir: Path, prefix: str = "edgefleet", drain_s: float = 120.0) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.seconds, self.interval, self.drain_s, self.workdir = seconds, interval, drain_s, workdir
        workers = max(1, min(workers, devices))
        sizes = [devices // workers + (k < devices % workers) for k in range(workers)]
        self.shares = [(sum(sizes[:k]), n) for k, n in enumerate(sizes)]  # (first device, devices) per worker
        self.procs: list[subprocess.Popen] = []
        self.latest: list[dict] = [{} for _ in self.shares]
        self._readers: list[threading.Thread] = []

    def start(self) -> "SimFleet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for k, (first, n) in enumerate(self.shares):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--broker", f"{self.host}:{self.port}",
                   "--devices", str(n), "--first", str(first), "--seconds", str(self.seconds), "--interval",
                   str(self.interval), "--prefix", self.prefix, "--drain-s", str(self.drain_s), "--wait-go",
                   "--out", str(self.workdir / f"sim-{k}.json")]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    stderr=open(self.workdir / f"sim-{k}.log", "w"))
            self.procs.append(proc)
            reader = threading.Thread(target=self._read, args=(k, proc), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, k: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                self.latest[k] = json.loads(line)
            except ValueError:
                pass

    def totals(self) -> dict:
        keys = ("connected", "sent", "acked", "refused", "unrouted_acks", "retried", "given_up", "connects", "drops",
                "connect_failures")
        return {key: sum(p.get(key, 0) for p in self.latest) for key in keys}

    @property
    def connected(self) -> int:
        return self.totals()["connected"]

    @property
    def done(self) -> bool:
        return all(p.get("phase") == "done" for p in self.latest)

    def failed(self) -> str | None:
        """Why a worker died before it was done, if one did."""
        for k, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0):
                return f"simulator worker {k} exited {proc.returncode}: see {self.workdir / f'sim-{k}.log'}"
        return None

    def _say(self, command: str) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(command + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def go(self) -> None:
        self._say("go")

    def stop(self) -> None:
        self._say("stop")

    def wait(self, timeout: float) -> dict:
        """The workers' results merged: ``counts`` summed, ``devices`` of all of them."""
        merged: dict = {"counts": {}, "devices": {}}
        for k, proc in enumerate(self.procs):
            proc.wait(timeout)  # a worker exits once done; closing its stdin first would stop it short
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            self._readers[k].join(5)
            out = json.loads((self.workdir / f"sim-{k}.json").read_text())
            for key, v in out["counts"].items():
                if isinstance(v, int):
                    merged["counts"][key] = merged["counts"].get(key, 0) + v
            merged["devices"].update(out["devices"])
        return merged

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True, help="HOST:PORT")
    ap.add_argument("--devices", type=int, default=250)
    ap.add_argument("--first", type=int, default=0, help="number of the first device (sim-00000...)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to publish")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between a device's metrics")
    ap.add_argument("--prefix", default="edgefleet")
    ap.add_argument("--connect-window", type=int, default=20, help="connections awaiting a CONNACK at once")
    ap.add_argument("--drain-s", type=float, default=120.0, help="longest wait for the last acknowledgements")
    ap.add_argument("--wait-go", action="store_true", help="publish on `go` from stdin, not once all connected")
    ap.add_argument("--out", help="where to write the per-device result (JSON)")
    args = ap.parse_args(argv)
    raise_file_limit()
    host, _, port = args.broker.rpartition(":")
    names = [f"sim-{i:05d}" for i in range(args.first, args.first + args.devices)]
    worker = Worker(host, int(port), names, args.interval, args.seconds, args.prefix, args.connect_window, args.drain_s)
    result = worker.run(sys.stdin.fileno() if args.wait_go else None,
                        report=lambda line: print(line, flush=True))
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(result, separators=(",", ":")))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
