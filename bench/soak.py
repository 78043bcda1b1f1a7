"""A soak of the fleet's telemetry path with faults: simulated devices -> Mosquitto -> two ingesters per store.

    .venv/bin/python bench/soak.py [--devices 1000] [--minutes 10 | --seconds S] [--interval 1] [--workers 4]
                                   [--db fleet.db ...] [--postgres] [--json] [--out bench/results/soak.json]

``--devices`` simulated devices (bench/fleetsim.py: each its own MQTT session, the agent's messages, QoS 1) send a
metrics message every ``--interval`` seconds for the run's length into a local Mosquitto that persists its state
(``LocalBroker(persistent=True)``). Every store (``--db``: SQLite files, or store URLs; ``--postgres`` adds a
throwaway PostgreSQL server's, tests/postgres.py) has its own share group and two ``pipeline fleet ingest``
processes in it, each with a stable client id (bench/ingest_tap.py: the CLI as it is, with a file of counters).
A plain subscriber counts what the broker delivers, for the broker's own rate. Faults, each when a third and a half
of the messages due were sent: the broker is stopped with SIGTERM (it saves its sessions and queues), and started
again on the same port from its saved state; then one ingester of every store is killed with SIGKILL and started
again with the same client id, as a supervisor would.

Afterwards, per store: sent, acknowledged (the broker's PUBACK), stored; ``missing``: acknowledged, not stored (must
be 0: every acknowledged message stored at least once); ``stored_unacked``: stored though its PUBACK never came;
``phantom``: stored rows no device sent; at most once holds by construction (UNIQUE (device_id, ts) in
``metrics``); ``duplicates``: metrics messages the ingesters were handed again (redeliveries, ignored by the store);
``ingest_rate`` (rows / s, first publish to the last row) against ``broker_rate`` (the plain subscriber's messages
/ s, first publish to the last it got) and their ratio (goal >= 0.9), and the same over a steady window before the
first fault (from 15% to 95% of the way to it).
Everything waits on observed counts, never on a sleep.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)
sys.path.insert(1, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from fleetsim import ACKED, REFUSED, UNROUTED, SimFleet  # noqa: E402
from soak_stores import Store, open_store  # noqa: E402

from device_agent.mqtt import MqttLink  # noqa: E402
from device_agent.protocol import Leaf, topic  # noqa: E402
from pipeline.broker import LocalBroker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "edgefleet"
PROBE = "soak-probe"
#: the poll interval of every wait below: each waits on an observed count, this is only how often it looks
POLL_S = 0.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(condition, timeout: float, what: str, check=None) -> float:
    """Until ``condition()`` holds (``check()`` may raise meanwhile); seconds it took. TimeoutError naming ``what``."""
    t0 = time.monotonic()
    while not condition():
        if check is not None:
            check()
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_S)  # poll interval
    return time.monotonic() - t0


@dataclass
class IngesterProc:
    """One ``pipeline fleet ingest`` of a store, started again (same client id) when killed."""

    store: Store
    group: str
    client_id: str
    broker_port: int
    workdir: Path
    lives: int = 0
    proc: subprocess.Popen | None = None
    stats_files: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.lives += 1
        stats = self.workdir / f"{self.client_id}.{self.lives}.stats.json"
        self.stats_files.append(stats)
        cmd = [sys.executable, str(ROOT / "bench" / "ingest_tap.py"), "fleet", "ingest", "--db", self.store.location,
               "--broker", f"127.0.0.1:{self.broker_port}", "--group", self.group, "--client-id", self.client_id]
        logfile = open(self.workdir / f"{self.client_id}.{self.lives}.log", "w")
        # its own directory: no deploy.yaml there, so the CLI takes --db and --broker alone
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env={**os.environ, "SOAK_STATS": str(stats)},
                                     stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logfile.close()

    def stats(self) -> list[dict]:
        return [json.loads(f.read_text()) for f in self.stats_files if f.exists()]

    def received(self) -> int:
        return sum(s["received"] for s in self.stats())

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log_tail = (self.workdir / f"{self.client_id}.{self.lives}.log").read_text(errors="replace")[-600:]
            raise RuntimeError(f"ingester {self.client_id} exited {self.proc.returncode}: {log_tail}")


class Counter:
    """The broker's own delivery rate: a plain subscriber (no storage) to every device's metrics. It is away from
    the broker's restart until every ingester takes messages again (``pause``, ``resume``): while the broker has
    forgotten the ingesters' shared subscriptions (Mosquitto 2.0), a plain subscriber would be the one the devices'
    telemetry is routed to, and the devices would not know to send it again (device_agent.mqtt, "unrouted")."""

    def __init__(self, broker) -> None:
        self.n, self.first, self.last = 0, None, None
        self.away_s, self._left = 0.0, None
        self._lock = threading.Lock()
        self.link = MqttLink(broker, "soak-counter", self._on, [(f"{PREFIX}/v1/+/{Leaf.METRICS.value}", 1)])

    def pause(self) -> None:
        self.link.stop()
        self._left = time.monotonic()

    def resume(self) -> None:
        self.link.start()
        self.away_s += time.monotonic() - self._left

    def _on(self, name: str, payload: bytes) -> None:
        with self._lock:
            now = time.monotonic()
            self.n += 1
            self.first = self.first or now
            self.last = now


def subscribe_all(ingesters: list[IngesterProc], broker, timeout: float = 120.0) -> None:
    """Publish ``online`` probes until every ingester has taken one: their sessions and subscriptions exist."""
    pub = MqttLink(broker, "soak-prober", lambda t, p: None).start()
    try:
        def taken() -> bool:
            pub.publish(topic(PREFIX, PROBE, Leaf.ONLINE), b"online", qos=1).wait_for_publish(10)
            return all(i.received() > 0 for i in ingesters)

        wait_for(taken, timeout, "every ingester to take a probe message",
                 check=lambda: [i.check() for i in ingesters])
    finally:
        pub.stop()


def stored_all(store: Store, keys: set) -> bool:
    """Every one of ``keys`` (device_id, ts) has its row; the rows are read only once there are enough of them."""
    return store.count() >= len(keys) and not keys - store.metric_counts().keys()


def drain_store(store: Store, keys: set, ingesters: list[IngesterProc], settle_s: float,
                timeout: float, poll=lambda: None) -> tuple[float, bool]:
    """Until every one of ``keys`` is stored: (seconds it took, False). A message the broker lost never comes, so
    the wait also ends once neither the store's rows nor its ingesters' counters changed for ``settle_s``: (seconds
    until the last change, True). An ingester holds an acknowledgement until its batch is committed, so once its
    counters stand still it holds nothing the broker gave it. ``poll()`` is called on every look (the samples)."""
    t0 = time.monotonic()
    last, changed = None, t0
    while not (poll(), stored_all(store, keys))[1]:
        for i in ingesters:
            i.check()
        now = (store.count(), [i.received() for i in ingesters])
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed >= settle_s:
            return changed - t0, True
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{store.location}: still storing after {timeout:g} s")
        time.sleep(POLL_S)  # poll interval
    return time.monotonic() - t0, False


def verify(result: dict, store: Store, restart_wall: float) -> dict:
    """Every acknowledged metrics message against the store's rows; ``missing_after_restart_s``: when the missing
    ones were sent, in seconds after the broker's restart began (first, last)."""
    acked, sent, unrouted_keys, unrouted, refused = set(), set(), set(), 0, 0
    for device, d in result["devices"].items():
        for _seq, ts, outcome, *_ in d["metrics"]:
            sent.add((device, ts))
            if outcome in (ACKED, UNROUTED):
                acked.add((device, ts))
            if outcome == UNROUTED:
                unrouted_keys.add((device, ts))
            unrouted += outcome == UNROUTED
            refused += outcome == REFUSED
    rows = store.metric_counts()
    stored = {k for k in rows if k[0] != PROBE}
    missing = acked - stored
    after = [ts - restart_wall for _, ts in missing]
    return {"sent": len(sent), "acked": len(acked), "unrouted": unrouted, "refused": refused,
            "stored": len(stored), "missing": len(missing), "missing_unrouted": len(missing & unrouted_keys),
            "stored_unacked": len(stored & sent - acked),
            "phantom": len(stored - sent), "stored_twice": sum(1 for n in rows.values() if n > 1),
            "missing_after_restart_s": [round(min(after), 2), round(max(after), 2)] if after else None,
            "missing_examples": sorted(missing)[:5]}


class Soak:
    """One run: ``start()`` (broker, stores, ingesters, devices connected), ``publish()`` (with the two faults on the
    way), ``drain()`` (each store until it holds what was acknowledged), ``close()``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="soak-"))
        self.pg = self.broker = self.fleet = self.counter = None
        self.stores: list[Store] = []
        self.ingesters: list[IngesterProc] = []
        self.samples: list[dict] = []
        self.faults: dict = {}
        self.t_go = 0.0

    def start(self) -> None:
        a = self.args
        locations = list(a.db or [str(self.work / "fleet.db")])
        if a.postgres:
            sys.path.insert(1, str(ROOT / "tests"))
            from postgres import LocalPostgres

            self.pg = LocalPostgres(self.work / "postgres").start()
            locations.append(self.pg.url("soak"))
        self.stores = [open_store(loc) for loc in locations]
        self.broker = LocalBroker("mosquitto", self.work / "broker", persistent=True).start()
        self.counter = Counter(self.broker.config)
        for k, store in enumerate(self.stores):  # a share group per store, two members each
            for member in ("a", "b"):
                ing = IngesterProc(store, f"soak{k}", f"soak{k}-{member}", self.broker.port, self.work)
                ing.start()
                self.ingesters.append(ing)
        subscribe_all(self.ingesters, self.broker.config)
        self.counter.link.start()
        log(f"{len(self.ingesters)} ingesters subscribed ({', '.join(s.location for s in self.stores)}); "
            f"broker :{self.broker.port}")
        self.fleet = SimFleet("127.0.0.1", self.broker.port, a.devices, a.workers, a.seconds, a.interval,
                              self.work / "sim", PREFIX).start()
        self.connect_s = wait_for(lambda: self.fleet.connected >= a.devices, 600, f"{a.devices} devices connected",
                                  check=_raise(self.fleet.failed))
        log(f"{a.devices} devices connected in {self.connect_s:.1f} s")

    def sample(self) -> dict:
        s = {"t": round(time.monotonic() - self.t_go, 2), **self.fleet.totals(), "delivered": self.counter.n,
             "stored": [st.count() for st in self.stores]}
        self.samples.append(s)
        return s

    def check(self) -> None:
        _raise(self.fleet.failed)()
        for i in self.ingesters:
            i.check()

    def publish(self) -> dict:
        """Every device's messages, the broker restarted after a third of them, an ingester per store killed after
        half; the devices' merged result."""
        a = self.args
        due = a.devices * a.seconds / a.interval
        self.t_go = time.monotonic()
        self.fleet.go()
        longest = a.seconds * 3 + 60
        wait_for(lambda: self.sample()["sent"] >= due / 3, longest, "a third of the messages sent", self.check)
        self.restart_broker()
        wait_for(lambda: self.sample()["sent"] >= due / 2, longest, "half of the messages sent", self.check)
        self.kill_ingesters()
        wait_for(lambda: (self.sample(), self.fleet.done)[1], longest + 300, "the simulated devices to finish",
                 self.check)
        self.publish_s = time.monotonic() - self.t_go
        return self.fleet.wait(120)

    def restart_broker(self) -> None:
        log("fault 1: broker restart (SIGTERM, then start from its saved state on the same port)")
        t, wall = time.monotonic(), time.time()
        before = self.fleet.totals()  # every device connected now will drop
        taken = [i.received() for i in self.ingesters]
        self.counter.pause()
        self.broker.stop()
        stopped = time.monotonic()
        self.broker.start(port=self.broker.port)
        f = self.faults["broker_restart"] = {"at_s": round(t - self.t_go, 1), "stop_s": round(stopped - t, 2),
                                             "down_s": round(time.monotonic() - t, 2), "wall": round(wall, 3)}
        n = self.args.devices
        back = wait_for(lambda: (s := self.sample())["drops"] >= before["drops"] + before["connected"]
                        and s["connected"] >= n, 300,
                        "every device dropped and connected again", self.check)
        f["devices_back_s"] = round(time.monotonic() - t, 1)
        wait_for(lambda: all(i.received() > n0 for i, n0 in zip(self.ingesters, taken)), 300,
                 "every ingester taking messages again", self.check)
        self.counter.resume()
        f["counter_away_s"] = round(self.counter.away_s, 1)
        log(f"  broker back in {f['down_s']} s, every device again {back:.1f} s later; the plain subscriber away "
            f"{self.counter.away_s:.1f} s")

    def kill_ingesters(self) -> None:
        killed = [i for i in self.ingesters if i.client_id.endswith("-a")]
        log(f"fault 2: kill -9 {', '.join(i.client_id for i in killed)}, started again with the same client id")
        t = time.monotonic()
        for i in killed:
            i.kill9()
            i.start()
        self.faults["ingester_kill"] = {"at_s": round(t - self.t_go, 1), "killed": [i.client_id for i in killed]}

    def drain(self, result: dict) -> list[tuple[Store, float]]:
        """(store, seconds until it held every acknowledged message, or until its last change) per store."""
        keys = {(d, ts) for d, v in result["devices"].items() for _, ts, outcome, *_ in v["metrics"]
                if outcome in (ACKED, UNROUTED)}
        log(f"devices done: sent {result['counts']['sent']}, acknowledged {len(keys)}; waiting for the stores")
        out = []
        for store in self.stores:
            mine = [i for i in self.ingesters if i.store is store]
            drain_s, settled = drain_store(store, keys, mine, self.args.settle_s, self.args.drain_s, self.sample)
            if settled:
                log(f"{store.location}: nothing more came for {self.args.settle_s:g} s; some acknowledged messages "
                    "are not stored")
            out.append((store, drain_s))
        self.sample()
        for i in self.ingesters:
            i.stop()  # SIGTERM: each commits and acknowledges what it holds, and writes its counters
        return out

    def close(self) -> None:
        for i in self.ingesters:
            i.stop()
        if self.fleet is not None:
            self.fleet.kill()
        if self.counter is not None:
            self.counter.link.stop()
        if self.broker is not None:
            self.broker.stop()
        for store in self.stores:
            store.close()
        if self.pg is not None:
            self.pg.stop()


def soak(args: argparse.Namespace) -> dict:
    run = Soak(args)
    try:
        run.start()
        result = run.publish()
        drained = run.drain(result)
        return report(run, result, drained)
    finally:
        run.close()


def _raise(failed):
    def check() -> None:
        why = failed()
        if why:
            raise RuntimeError(why)
    return check


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def steady(samples: list[dict], k: int, until_s: float) -> dict | None:
    """Store ``k``'s rows per second against the plain subscriber's, from 15% to 95% of the way to ``until_s``."""
    window = [s for s in samples if 0.15 * until_s <= s["t"] <= 0.95 * until_s]
    if len(window) < 2:
        return None
    a, b = window[0], window[-1]
    dt = b["t"] - a["t"]
    out = {"from_s": a["t"], "to_s": b["t"], "ingest_rate": round((b["stored"][k] - a["stored"][k]) / dt, 1),
           "broker_rate": round((b["delivered"] - a["delivered"]) / dt, 1),
           "acked_rate": round((b["acked"] - a["acked"]) / dt, 1)}
    return {**out, "ingest_vs_broker": _ratio(out["ingest_rate"], out["broker_rate"])}


SIM_COUNTS = ("sent", "acked", "refused", "unrouted_acks", "retried", "given_up", "connects", "drops",
              "connect_failures")


def report(run: Soak, result: dict, drained: list[tuple[Store, float]]) -> dict:
    args, samples, faults, counter = run.args, run.samples, run.faults, run.counter
    # both rates from the first publish to the last message each got: the same faults and lulls are in both spans
    broker_rate = round(counter.n / (counter.last - run.t_go - counter.away_s), 1) if counter.last else None
    stores = []
    for k, (store, drain_s) in enumerate(drained):
        v = verify(result, store, faults["broker_restart"]["wall"])
        lives = [s for i in run.ingesters if i.store is store for s in i.stats()]
        grew = [s["t"] for a, s in zip(samples, samples[1:]) if s["stored"][k] > a["stored"][k]]  # POLL_S apart
        ingest_rate = round(v["stored"] / grew[-1], 1) if grew else None
        stores.append({"store": store.kind, "location": store.location, **v,
                       "duplicates": sum(s["committed_metrics"] for s in lives) - v["stored"],
                       "ingester_lives": len(lives), "ingest_rate": ingest_rate, "broker_rate": broker_rate,
                       "ingest_vs_broker": _ratio(ingest_rate, broker_rate), "drain_s": round(drain_s, 1),
                       "steady": steady(samples, k, faults["broker_restart"]["at_s"])})
    c = result["counts"]
    return {"broker": broker_version(), "devices": args.devices, "seconds": args.seconds, "interval_s": args.interval,
            "workers": args.workers, "host": {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
                                              "python": platform.python_version()},
            "connect_s": round(run.connect_s, 1), "publish_s": round(run.publish_s, 1),
            "sim": {k: c.get(k) for k in SIM_COUNTS},
            "delivered_to_plain_subscriber": counter.n, "faults": faults, "stores": stores,
            "ok": all(s["missing"] == 0 and s["phantom"] == 0 and s["stored_twice"] == 0 for s in stores)}


def broker_version() -> str:
    from pipeline.broker import mosquitto_binary

    out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "mosquitto"


def _cell(v) -> str:
    return " - ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else str(v)


def print_table(r: dict) -> None:
    cols = [f"{s['store']}" for s in r["stores"]]
    rows = [("sent", "sent"), ("acknowledged", "acked"), ("  of them unrouted, given up", "unrouted"),
            ("refused", "refused"), ("stored", "stored"), ("missing (acked, not stored)", "missing"),
            ("  of them unrouted", "missing_unrouted"),
            ("  sent s after the restart", "missing_after_restart_s"),
            ("stored, never acknowledged", "stored_unacked"), ("phantom (never sent)", "phantom"),
            ("stored twice", "stored_twice"), ("duplicates (redeliveries)", "duplicates"),
            ("ingester lives", "ingester_lives"), ("ingest rate /s", "ingest_rate"), ("broker rate /s", "broker_rate"),
            ("ingest / broker", "ingest_vs_broker"), ("drain after last publish, s", "drain_s")]
    width = max(len(n) for n, _ in rows) + 2
    print(f"soak: {r['devices']} devices x 1 metrics / {r['interval_s']} s for {r['seconds']} s "
          f"({r['workers']} simulator processes); connected in {r['connect_s']} s")
    br, ik = r["faults"]["broker_restart"], r["faults"]["ingester_kill"]
    print(f"faults: broker restart at {br['at_s']} s (down {br['down_s']} s, every device back after "
          f"{br['devices_back_s']} s); kill -9 of {', '.join(ik['killed'])} at {ik['at_s']} s")
    sim = r["sim"]
    print(f"devices: {sim['unrouted_acks']} PUBACKs 'no matching subscribers', {sim['retried']} messages published "
          f"again, {sim['given_up']} given up")
    print(f"{'':{width}s}" + "".join(f"{c:>14s}" for c in cols))
    for name, key in rows:
        print(f"{name:{width}s}" + "".join(f"{_cell(s.get(key)):>14s}" for s in r["stores"]))
    for name, key in (("steady ingest /s", "ingest_rate"), ("steady broker /s", "broker_rate"),
                      ("steady ingest / broker", "ingest_vs_broker")):
        print(f"{name:{width}s}" + "".join(f"{str((s['steady'] or {}).get(key)):>14s}" for s in r["stores"]))
    print("every acknowledged message stored exactly once" if r["ok"] else "FAILED: see missing / phantom above")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between a device's metrics")
    ap.add_argument("--workers", type=int, default=4, help="simulator processes")
    ap.add_argument("--db", nargs="+", help="stores: SQLite files or store URLs (default: one SQLite file)")
    ap.add_argument("--postgres", action="store_true", help="also a throwaway PostgreSQL server's store")
    ap.add_argument("--drain-s", type=float, default=600, help="longest wait for the stores after the last ack")
    ap.add_argument("--settle-s", type=float, default=15,
                    help="stop waiting for a store once nothing changed for this long (messages the broker lost)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", help="also write the result (JSON) here, e.g. bench/results/soak.json")
    args = ap.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (args.minutes or 10) * 60
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the finally clauses stop every child
    r = soak(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
