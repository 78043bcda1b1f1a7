"""Simulated devices that take an over-the-air transfer with the agent's own code, over real MQTT, many per process.

    .venv/bin/python bench/transfersim.py --broker 127.0.0.1:1883 --devices 500 --first 0 --tag s1000 \\
                                          --state /dev/shm/sim --key keys/signing.pub [--keepalive 30]

bench/scale.py runs these workers with ``--sim``: a real agent is a thread with its own network thread, and 1,000 of
them on two cores starve (keep-alives missed, sessions dropped: docs/protocol.md). Here each device is a
:class:`SimAgent`, the agent's download as it is, ``device_agent.transfer.TransferControl`` (the job's broadcast, asks
on evidence, repairs on its own stream, silences and their backoff, resumption from disk after a restart), on a paho
client of its own, every client of the process driven by one thread (bench/mqttloop.py). Its MQTT session is the
agent's: client id ``agent-<device>``, MQTT 5, persistent (a week's session expiry), a retained Last Will
``offline``, subscribed to its ``job``, ``stream/data``, ``stream/rejected`` and ``cmd`` (and a job's artifact topic);
on every connection it says ``online`` and its status, and carries its transfer on as the agent does. A job is
verified as the agent verifies it (signature, target, version, expiry); every chunk is checked and written to a
``device_agent.download.Download`` in the device's own state directory, checkpointed; the whole is checked against
the manifest's size and sha256 (``verifying``). There it stops being an agent: nothing is decoded, installed or
health-checked (bench/scale.py's real agents do all of it); it says ``activated`` and sends Metrics of the version.

A worker writes ``ready`` once all its devices are connected, then takes lines on stdin: ``drop F kept|lost`` arms
drop-offs for the next transfer (answers ``armed``), ``report`` answers one JSON line of what they did, end of input
ends it. A device chosen to drop off (``scale.dropping``, evenly spread) does so once it holds a quarter of the
job's chunks: its connection is cut without a DISCONNECT (the broker publishes its will) and the device is gone, as
an agent whose link died with its process. It comes back once a device of its worker that stayed has the whole
artifact (the broadcast has gone by): a new SimAgent on the same state directory, picking the download up from
disk, with its broker session kept (what was published meanwhile queued for it) or, with ``lost``, discarded first.

``--link-kbps K`` gives every device a downlink of K kbit/s (LTE-M is about 1,000, NB-IoT 20-250): it reads its
socket no faster than such a link brings the bytes, and what the broker sends it waits in TCP meanwhile.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(1, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from device_agent.errors import ProtocolError, VerificationError  # noqa: E402
from device_agent.guard import RateLimit  # noqa: E402
from device_agent.manifest import Manifest, load_public_key, keyid, verify_envelope  # noqa: E402
from device_agent.protocol import (ARTIFACTS_LEVEL, PROTOCOL_VERSION, Event, Job, Leaf, Metrics,  # noqa: E402
                                   ResultCode, State, Status, artifact_topic, decode, encode, parse_topic, short,
                                   topic)
from device_agent.storage import atomic_write_json, read_json  # noqa: E402
from device_agent.transfer import TransferControl, _Transfer  # noqa: E402
from mqttloop import Loop, raise_file_limit  # noqa: E402

log = logging.getLogger("transfersim")

#: a week, as device_agent.mqtt.MqttLink asks for an agent's persistent session
SESSION_EXPIRY_S = 7 * 24 * 3600
#: how often every device's silences are looked at (the agent's worker wakes every 0.5 s)
TICK_S = 0.5
_KEPT = {s.value for s in (State.ACTIVATED, State.ROLLED_BACK, State.FAILED)}


def dropping(i: int, fraction: float) -> bool:
    """Whether device ``i`` is one of the ``fraction`` that drop off: evenly spread (as bench/scale.py's)."""
    return int(i * fraction) != int((i + 1) * fraction)


class SimLink:
    """The part of device_agent.mqtt.MqttLink that TransferControl uses, on a client of the worker's loop."""

    def __init__(self, dev: "SimAgent", host: str, port: int, keepalive: int, clean: bool) -> None:
        self.dev = dev
        self.subscriptions: list[tuple[str, int]] = [(dev._t(leaf), 1) for leaf in (
            Leaf.JOB, Leaf.STREAM_DATA, Leaf.STREAM_REJECTED, Leaf.CMD)]
        self.session_present = False
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"agent-{dev.device_id}",
                                      protocol=mqtt.MQTTv5, userdata=dev)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        c.will_set(dev._t(Leaf.ONLINE), b"offline", qos=1, retain=True)
        c.on_connect, c.on_disconnect, c.on_message = _on_connect, _on_disconnect, _on_message
        dev.fleet.wire(c)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        # ``clean``: the first connection discards the broker's session (and what it queued); later ones keep the
        # new session, as an agent's always do
        c.connect_async(host, port, keepalive=keepalive, properties=props,
                        clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY if clean else False)

    def subscribe(self, name: str, qos: int = 1) -> None:
        if (name, qos) not in self.subscriptions:
            self.subscriptions.append((name, qos))
        if self.dev.connected:
            self.client.subscribe(name, qos)

    def unsubscribe(self, name: str) -> None:
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != name]
        if self.dev.connected:
            self.client.unsubscribe(name)

    def publish(self, name: str, payload: bytes, qos: int = 1, retain: bool = False, until_routed: bool = False):
        return self.client.publish(name, payload, qos=qos, retain=retain)  # queued by paho while disconnected


class SimAgent(TransferControl):
    """One device: the agent's transfer, its messages and persisted state; no model runtime."""

    def __init__(self, fleet: "Worker", device_id: str, index: int, clean: bool = False) -> None:
        self.fleet, self.device_id, self.index = fleet, device_id, index
        self.cfg = SimpleNamespace(device_id=device_id, topic_prefix=fleet.prefix, target=fleet.target,
                                   broker=SimpleNamespace(ca_file=None))
        self.root = fleet.state / device_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.trusted = fleet.trusted
        self._state_path = self.root / "state.json"
        self.state: dict[str, Any] = read_json(self._state_path, {"highest_version": 0, "state": State.IDLE.value})
        self.boot = int(self.state.get("boot", 0)) + 1
        self._save_state(boot=self.boot)
        self._seq = itertools.count(1)
        self.limit = RateLimit()
        self.broadcast_refused = 0
        self.errors = 0  # messages whose handling raised (counted, never let out)
        self._transfer: _Transfer | None = None
        self._pending_events: list[tuple[str, str, str | None]] = []
        self._inbox = None  # no HTTP transfers here (see _on_job)
        self.connected, self.connecting_since, self.delay = False, None, 0.5
        self.had_transfer = False  # the latest job's transfer began (drop-offs wait for it)
        self.finished = False  # ... and ended
        self.link = SimLink(self, fleet.host, fleet.port, fleet.keepalive, clean)
        self._reopen_transfer()  # after a restart: the download on disk
        if self._transfer is not None:
            self.had_transfer = True

    @property
    def client(self) -> mqtt.Client:
        return self.link.client

    # -- what TransferControl and the agent's messages need -----------------------------------------------------
    def _t(self, leaf: Leaf) -> str:
        return topic(self.fleet.prefix, self.device_id, leaf)

    def _save_state(self, **changes: Any) -> None:
        self.state.update(changes)
        atomic_write_json(self._state_path, self.state)

    def _publish_status(self, state: State, **fields: Any) -> None:
        s = Status(device_id=self.device_id, state=state.value, target=self.fleet.target,
                   active_version=self.state.get("active_version"), active_slot=self.state.get("active_slot"),
                   agent_version="transfersim", boot=self.boot, seq=next(self._seq), **fields)
        self.link.publish(self._t(Leaf.STATUS), encode(s), qos=1, retain=True)

    def _event(self, kind: str, message: str, limited: bool = False, **fields: Any) -> None:
        if limited and not self.limit.allow():
            return
        e = Event(self.device_id, kind, message[:400], boot=self.boot, seq=next(self._seq), **fields)
        self.link.publish(self._t(Leaf.EVENTS), encode(e), qos=1)

    def _refuse(self, job_id: str, version: int | None, reason: str, code: int) -> None:
        self._save_state(state=State.FAILED.value, job_id=job_id, version=version, reason=reason)
        self._publish_status(State.FAILED, job_id=job_id, version=version, reason=reason, result_code=int(code))
        self._event("refused", reason, job_id=job_id, version=version, result_code=int(code))
        self.finished = True

    def _begin_transfer(self, job: Job, manifest: Manifest) -> None:
        super()._begin_transfer(job, manifest)
        self.had_transfer, self.finished = True, False

    def _finish(self, tr: _Transfer) -> None:
        """The agent's end of a transfer up to its verification; then ``activated`` (no install, no health check)."""
        if not self._verify_download(tr):
            return
        m = tr.manifest
        tr.download.discard()  # its bytes are checked; keeping 1,000 copies would only fill memory
        slot = "b" if self.state.get("active_slot") == "a" else "a"
        self._save_state(state=State.ACTIVATED.value, highest_version=m.version, active_version=m.version,
                         active_slot=slot, reason=None)
        self._publish_status(State.ACTIVATED, job_id=tr.job_id, version=m.version, result_code=int(ResultCode.SUCCESS))
        self._event("activated", f"v{m.version} verified (simulated: not installed)", job_id=tr.job_id,
                    version=m.version)
        metrics = Metrics(self.device_id, m.version, 1.0, 1.0, 1.0, 0, True, slot=slot, state=State.ACTIVATED.value,
                          boot=self.boot, seq=next(self._seq))
        self.link.publish(self._t(Leaf.METRICS), encode(metrics), qos=1)
        self.finished = True

    # -- the agent's dispatch, for what a transfer needs ---------------------------------------------------------
    def on_link_up(self) -> None:
        """(Re)connected: as the agent, ``online``, the events kept for now, the status, the transfer carried on."""
        self.link.publish(self._t(Leaf.ONLINE), b"online", qos=1, retain=True)
        while self._pending_events:
            kind, message, job_id = self._pending_events.pop(0)
            self._event(kind, message, job_id=job_id)
        state = self.state.get("state", State.IDLE.value)
        self._publish_status(State(state) if state in _KEPT else State.IDLE, job_id=self.state.get("job_id"),
                             version=self.state.get("version"))
        self._resume_transfer()

    def handle(self, name: str, payload: bytes) -> None:
        """Total, as the agent's: what raises is counted, never let out of the loop."""
        try:
            if name.startswith(f"{self.fleet.prefix}/v{PROTOCOL_VERSION}/{ARTIFACTS_LEVEL}/"):
                if payload:
                    self._on_chunk(payload, via_broadcast=True)
                return
            _, leaf = parse_topic(self.fleet.prefix, name)
            if leaf is Leaf.JOB and payload:
                self._on_job(Job.parse(payload))
            elif leaf is Leaf.STREAM_DATA:
                self._on_chunk(payload)
            elif leaf is Leaf.STREAM_REJECTED:
                self._on_rejected(decode(payload, "stream/rejected"))
        except ProtocolError as exc:
            self._event("protocol_error", f"{short(name, 100)}: {exc}", limited=True)
        except Exception:  # noqa: BLE001 - a simulator's bug must not stop the other devices of its process
            log.exception("%s: handling a message on %s failed", self.device_id, short(name, 100))
            self.errors += 1

    def _on_job(self, job: Job) -> None:
        """The agent's acceptance of a model job (device_agent.agent.Agent._on_job) without what a simulated device
        has not got: shadows, calibrations, deltas against an installed model, HTTP transfers."""
        if job.job_id == self.state.get("job_id") and self.state.get("state") in _KEPT:
            return  # a retained job already finished
        if self._transfer is not None and self._transfer.job_id == job.job_id:
            return
        if job.artifact_topic is not None and job.artifact_topic != artifact_topic(self.fleet.prefix, job.job_id):
            raise ProtocolError(f"job: artifact_topic {short(job.artifact_topic)} is not this device's")
        try:
            m = Manifest.from_signed(verify_envelope(job.manifest, self.trusted))
            if m.target != self.fleet.target:
                raise VerificationError(f"manifest is for target {m.target!r}", ResultCode.UNSUPPORTED_PACKAGE)
            if m.version <= int(self.state.get("highest_version", 0)):
                raise VerificationError(f"version {m.version} is not newer", ResultCode.UPDATE_FAILED)
            m.check_expiry()
            if m.url or m.kind != "model":
                raise VerificationError("the simulator takes models over MQTT only", ResultCode.UNSUPPORTED_PACKAGE)
        except VerificationError as exc:
            return self._event("refused", str(exc), limited=True, job_id=job.job_id, result_code=int(exc.result_code))
        self._begin_transfer(job, m)


def _on_connect(client, dev: SimAgent, flags, reason_code, properties) -> None:
    w = dev.fleet
    w.connecting.discard(dev)
    dev.connecting_since = None
    if reason_code.is_failure:
        client.disconnect()
        return
    dev.connected, dev.delay = True, 0.5
    dev.link.session_present = bool(flags.session_present)
    w.connects += 1
    for name, qos in dev.link.subscriptions:  # also on a kept session: subscribing again brings retained messages
        client.subscribe(name, qos)
    try:
        dev.on_link_up()
    except Exception:  # noqa: BLE001 - as in handle(): counted, never out of the loop
        log.exception("%s: carrying on after a connection failed", dev.device_id)
        dev.errors += 1


def _on_disconnect(client, dev: SimAgent, flags, reason_code, properties) -> None:
    w = dev.fleet
    w.connecting.discard(dev)
    if dev.connected and not w.closing and w.devices[dev.index] is dev:
        w.disconnects += 1
    dev.connected, dev.connecting_since = False, None
    if not w.closing and w.devices[dev.index] is dev:  # a device that dropped off is gone with its client
        w.backoff(dev)


def _on_message(client, dev: SimAgent, message) -> None:
    dev.fleet.charge(dev, len(message.payload) + len(message.topic) + 8)  # what it took of its link (see Loop)
    dev.handle(message.topic, message.payload)


class Worker(Loop):
    """One process's simulated devices, driven by one thread."""

    def __init__(self, host: str, port: int, names: list[str], first: int, state: Path, key: Path,
                 prefix: str = "edgefleet", target: str = "rpi4", keepalive: int = 30,
                 connect_window: int = 20, link_kbps: float | None = None) -> None:
        super().__init__(connect_window, link_kbps * 1000 / 8 if link_kbps else None)
        self.host, self.port, self.prefix, self.target, self.keepalive = host, port, prefix, target, keepalive
        self.first, self.state = first, state
        public = load_public_key(key)
        self.trusted = {keyid(public): public}
        self.connects = self.disconnects = 0
        self.devices = [SimAgent(self, d, i) for i, d in enumerate(names)]
        for dev in self.devices:
            self.schedule(dev, 0.0)
        self.drops: dict[str, Any] | None = None

    # -- drop-offs ---------------------------------------------------------------------------------------------
    def arm(self, fraction: float, lose_session: bool) -> None:
        chosen = [k for k in range(len(self.devices)) if dropping(self.first + k, fraction)]
        stay = next((k for k in range(len(self.devices)) if k not in chosen), None)
        self.drops = {"chosen": set(chosen), "stay": stay, "lose": lose_session, "gone": set(),
                      "dropped": [], "back": [], "missed": []}
        for dev in self.devices:
            dev.had_transfer = dev.finished = False

    def may_connect(self, dev) -> bool:
        return self.drops is None or dev.index not in self.drops["gone"]

    def _watch_drops(self) -> None:
        d = self.drops
        if d is None:
            return
        for k in list(d["chosen"]):
            dev = self.devices[k]
            tr = dev._transfer
            if tr is not None and len(tr.download.have) >= max(1, tr.manifest.chunks // 4):
                d["chosen"].discard(k)
                self._cut(dev)
            elif dev.finished:
                d["chosen"].discard(k)
                d["missed"].append(dev.device_id)
        ref = self.devices[d["stay"]] if d["stay"] is not None else None
        if d["gone"] and (ref is None or ref.finished):
            for k in sorted(d["gone"]):
                self._come_back(k)
            d["gone"].clear()

    def _cut(self, dev: SimAgent) -> None:
        """The device's link dies with its process: no DISCONNECT, so the broker publishes its will."""
        self.drops["gone"].add(dev.index)
        self.drops["dropped"].append(dev.device_id)
        if dev._transfer is not None:
            dev._transfer.download.close()  # what the process had written is on disk; the rest is lost with it
        dev.connected = False
        dev.client._sock_close()  # noqa: SLF001 - an abrupt loss, as a process killed with its connection

    def _come_back(self, k: int) -> None:
        """A new process on the same state directory; its session kept, or discarded first (``lose``)."""
        old = self.devices[k]
        back = SimAgent(self, old.device_id, k, clean=self.drops["lose"])
        self.devices[k] = back
        self.drops["back"].append(back.device_id)
        self.schedule(back, 0.0)

    def report(self) -> dict:
        d = self.drops or {"dropped": [], "back": [], "missed": []}
        self.drops = None
        return {"dropped": d["dropped"], "back": d["back"], "missed": d["missed"]}

    # -- the loop ----------------------------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"connected": self.connected, "connects": self.connects, "disconnects": self.disconnects,
                "connect_failures": self.connect_failures,
                "errors": sum(d.errors for d in self.devices),
                "broadcast_refused": sum(d.broadcast_refused for d in self.devices)}

    def run(self, commands: int, say=print) -> None:
        self.watch_commands(commands)
        ready, next_misc, next_tick = False, 0.0, 0.0
        while True:
            for line in self.pump(0.05):
                cmd = line.split()
                if cmd == ["eof"]:
                    return self._stop()
                if cmd[:1] == ["drop"]:
                    self.arm(float(cmd[1]), cmd[2] == "lost")
                    say("armed")
                elif cmd[:1] == ["report"]:
                    say(json.dumps({**self.report(), "counts": self.counts()}))
            now = time.monotonic()
            if not ready and self.connected == len(self.devices):  # (counted only until all are in)
                ready = True
                say("ready")
            self._watch_drops()
            self.connect_due(now)
            if now >= next_tick:
                next_tick = now + TICK_S
                for dev in self.devices:
                    if dev.connected:
                        dev._tick()
            if now >= next_misc:
                next_misc = now + 1.0
                self.misc(now)

    def _stop(self, timeout: float = 10.0) -> None:
        """As agents stopping: ``offline`` (retained), then DISCONNECT."""
        self.closing = True
        for dev in self.devices:
            if dev.connected:
                dev.link.publish(dev._t(Leaf.ONLINE), b"offline", qos=1, retain=True)
                dev.client.disconnect()
        deadline = time.monotonic() + timeout
        while any(d.connected for d in self.devices) and time.monotonic() < deadline:
            self.pump(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True, help="HOST:PORT")
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="number of the first device")
    ap.add_argument("--tag", default="sim", help="devices are <tag>-<number>")
    ap.add_argument("--state", required=True, help="the devices' state directories go under this one")
    ap.add_argument("--key", required=True, help="the host's signing public key (the devices trust it)")
    ap.add_argument("--prefix", default="edgefleet")
    ap.add_argument("--target", default="rpi4")
    ap.add_argument("--keepalive", type=int, default=30)
    ap.add_argument("--connect-window", type=int, default=20, help="connections awaiting a CONNACK at once")
    ap.add_argument("--link-kbps", type=float, help="each device's downlink in kbit/s (default: loopback's speed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise_file_limit()
    host, _, port = args.broker.rpartition(":")
    names = [f"{args.tag}-{i:04d}" for i in range(args.first, args.first + args.devices)]
    worker = Worker(host, int(port), names, args.first, Path(args.state), Path(args.key), args.prefix, args.target,
                    args.keepalive, args.connect_window, args.link_kbps)
    worker.run(sys.stdin.fileno(), say=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
