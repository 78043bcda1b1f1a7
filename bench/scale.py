"""Fleet scale: host egress and wall time of one ~1 MB model to N agents, unicast vs broadcast, side by side.

    .venv/bin/python bench/scale.py [--devices 1,10,50] [--drop 0.05] [--sim] [--out bench/results/scale.json]

For each N, N real device agents (a thread each, its own MQTT session and state directory: verify, download,
fsync, install, health-check, activate) run in worker processes of at most 150 agents (paho-mqtt waits on its
sockets with select(), which takes no descriptor above 1023: one process holds about 200 agents), on one loopback
Mosquitto, the host's side in this process; the same agents take v(2k+1)
unicast (``broadcast="never"``: each device's chunks on its own ``stream/data``) and then v(2k+2) broadcast
(``broadcast="always"``: each chunk once on the job's artifact topic, repairs per device).
- egress_bytes: chunk frames the host published (broadcast + per-device), and egress / artifact bytes;
- wall_s: the delivery until every device activated and sent its metrics (health checks included);
- download_s: until the last device had every chunk (its first ``verifying`` status): the transfer alone, before
  the health checks, which N agents sharing this machine's cores run one after another in effect;
- broadcast_s: the broadcast's own publishing time; repair_bytes: what devices asked for on their own (served to
  each, or once on the artifact topic for several: rebroadcast_chunks); deferred_chunks: asked for by agents that
  had not yet seen the broadcast pass, left to it (they were on their way).
- ``--drop F`` adds a third round, ``drop``: broadcast again while a fraction F of the agents (evenly spread)
  drop off mid-transfer, once they hold a quarter of the chunks: the agent stops (its broker session, persistent,
  keeps what is broadcast meanwhile queued for it), or with ``--drop-session lost`` its session is discarded too,
  so what was broadcast while it was away is gone; it comes back once an agent of its worker that stayed has the
  whole artifact (the broadcast has gone by) and must still activate. dropped / dropped_activated, and
  dropped_repair_chunks against others_repair_chunks, say what that cost.
- broker_cpu_s, devices_cpu_s, host_cpu_s: CPU seconds the broker, the devices' processes and the host spent in the
  round (two cores are shared by all three: what bounds wall_s here), broker_peak_rss_mb its memory at most.
- ``--sim``: simulated devices instead of agents (bench/transfersim.py: the agent's own transfer code and MQTT
  session, up to verifying the artifact's sha256, many devices per process on one event loop); 1,000 agents a thread
  each starve on two cores (docs/protocol.md), 1,000 simulated devices do not. A simulated drop-off cuts the
  connection abruptly and comes back from disk. ``--link-kbps K`` gives each simulated device a K kbit/s downlink
  (LTE-M about 1,000, NB-IoT 20-250): where devices are bound by their links rather than by this machine's two
  cores, the wall times compare as they would on a fleet.
- ``--agent-wait S`` sets the agents' first silence (device_agent.transfer.BROADCAST_WAIT_S, 20 s) to S: at 1,000
  agents on two cores the broadcast's first chunk reached many agents more than 20 s after their job; a short
  wait makes a small fleet see its broadcast as late as that one did.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402

from device_agent.agent import Agent  # noqa: E402
from device_agent.config import AgentConfig, BrokerConfig  # noqa: E402

PREFIX = "edgefleet"


#: agents started at once; the next batch starts when these have connected (1,000 at once on two cores time out
#: their CONNACKs and reconnect in a storm)
BATCH = 25
#: agents per worker process (see the module's note on select())
PER_PROCESS = 150


def device_id(tag: str, i: int) -> str:
    return f"{tag}-{i:04d}"


def start_agents(ids: range, broker, root: Path, key: Path, tag: str) -> list[tuple[Agent, threading.Thread]]:
    out = []
    for first in range(ids.start, ids.stop, BATCH):
        batch = []
        for i in range(first, min(ids.stop, first + BATCH)):
            cfg = AgentConfig(device_id=device_id(tag, i), target="rpi4", state_dir=root / device_id(tag, i),
                              trusted_keys=(key,), broker=broker, topic_prefix=PREFIX, benchmark_runs=5, threads=1)
            agent = Agent(cfg)
            t = threading.Thread(target=agent.run, daemon=True)
            t.start()
            batch.append((agent, t))
        deadline = time.monotonic() + 120
        for a, _ in batch:  # each agent's own connection event: no polling loop of sleeps
            if not a.link.connected.wait(max(0.0, deadline - time.monotonic())):
                raise SystemExit(f"{a.cfg.device_id} did not connect within 120 s ({len(out)} connected before)")
        out += batch
    return out


def stop_agents(agents) -> None:
    for a, _ in agents:
        a.stop()
    for _, t in agents:
        t.join(10)


def dropping(i: int, fraction: float) -> bool:
    """Whether agent ``i`` is one of the ``fraction`` that drop off: evenly spread, the same in bench and worker."""
    return int(i * fraction) != int((i + 1) * fraction)


def forget_session(broker, device: str) -> None:
    """Discard an agent's broker session (what the broker queued for it while away is gone): connect with its client
    id and a clean start, then leave."""
    from device_agent.mqtt import MqttLink

    MqttLink(broker, f"agent-{device}", lambda *a: None).start().stop()


class DropOffs:
    """A worker's agents that drop off mid-transfer in the next delivery, and come back (see the module's note)."""

    def __init__(self, agents: list, first: int, fraction: float, lose_session: bool, broker) -> None:
        self.agents, self.broker, self.lose_session = agents, broker, lose_session
        self.dropped: list[str] = []
        self.back: list[str] = []
        self.missed: list[str] = []  # chosen, but had every chunk before it could drop
        self.stop = threading.Event()
        chosen = [k for k in range(len(agents)) if dropping(first + k, fraction)]
        stay = next((k for k in range(len(agents)) if k not in chosen), None)
        self.threads = [threading.Thread(target=self._drop, args=(k, stay), daemon=True) for k in chosen]
        for t in self.threads:
            t.start()

    def _poll(self, done) -> bool:
        while not self.stop.is_set():
            if done():
                return True
            self.stop.wait(0.02)  # poll interval: the agents' own threads move their transfers on
        return False

    def _drop(self, k: int, stay: int | None) -> None:
        agent, thread = self.agents[k]
        ref = self.agents[stay][0] if stay is not None else None
        seen: dict[str, object] = {}

        def ref_done() -> bool:  # the agent that stayed had a transfer, and it is over: the broadcast has gone by
            tr = ref._transfer
            if tr is not None:
                seen["tr"] = tr
            return "tr" in seen and tr is None

        def mid_transfer() -> bool:
            if ref is not None:
                ref_done()
            tr = agent._transfer
            if tr is not None:
                seen["own"] = tr
            return tr is not None and len(tr.download.have) >= max(1, tr.manifest.chunks // 4) \
                or ("own" in seen and tr is None)

        if not self._poll(mid_transfer):
            return
        if agent._transfer is None:
            self.missed.append(agent.cfg.device_id)
            return
        agent.stop()
        thread.join(30)
        if self.lose_session:
            forget_session(self.broker, agent.cfg.device_id)
        self.dropped.append(agent.cfg.device_id)
        if ref is not None and not self._poll(ref_done):
            return
        back = Agent(agent.cfg)
        t = threading.Thread(target=back.run, daemon=True)
        t.start()
        if back.link.connected.wait(120):
            self.back.append(agent.cfg.device_id)
        self.agents[k] = (back, t)

    def report(self) -> str:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return json.dumps({"dropped": self.dropped, "back": self.back, "missed": self.missed})


def host_agents(args) -> None:
    """A worker: run agents ``--host-agents FIRST:COUNT``, say ``ready`` once all are connected; then take commands
    from stdin until the bench closes it: ``drop FRACTION lost|kept`` arms drop-offs for the next delivery (answers
    ``armed``), ``report`` answers what they did (one JSON line)."""
    first, count = (int(x) for x in args.host_agents.split(":"))
    if args.agent_wait is not None:
        import device_agent.transfer

        device_agent.transfer.BROADCAST_WAIT_S = args.agent_wait
    broker = BrokerConfig(host="127.0.0.1", port=args.broker_port,
                          **({"keepalive": args.keepalive} if args.keepalive is not None else {}))
    agents = start_agents(range(first, first + count), broker, Path(args.state), Path(args.key), args.tag)
    print("ready", flush=True)
    drops: DropOffs | None = None
    for line in sys.stdin:  # until the bench closes our stdin
        cmd = line.split()
        if cmd[:1] == ["drop"]:
            drops = DropOffs(agents, first, float(cmd[1]), cmd[2] == "lost", broker)
            print("armed", flush=True)
        elif cmd[:1] == ["report"]:
            print(drops.report() if drops else json.dumps({}), flush=True)
            drops = None
    if drops is not None:
        drops.report()
    stop_agents(agents)


class Fleet:
    """``n`` agents in worker processes of at most PER_PROCESS; ``ids`` once every one is connected."""

    def __init__(self, n: int, broker, root: Path, key: Path, tag: str, agent_wait: float | None = None,
                 keepalive: int | None = None) -> None:
        self.ids = [device_id(tag, i) for i in range(n)]
        wait = ["--agent-wait", str(agent_wait)] if agent_wait is not None else []
        wait += ["--keepalive", str(keepalive)] if keepalive is not None else []
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "--host-agents", f"{first}:{min(PER_PROCESS, n - first)}", "--tag", tag,
             "--state", str(root), "--key", str(key), "--broker-port", str(broker.port), *wait],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for first in range(0, n, PER_PROCESS)]
        for p in self.procs:  # each worker's own line: no polling
            if p.stdout.readline().strip() != "ready":
                self.stop()
                raise SystemExit(f"a worker of {tag} failed (exit {p.wait()})")

    def ask(self, command: str) -> list[str]:
        """Every worker's one-line answer to ``command``."""
        for p in self.procs:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        return [p.stdout.readline().strip() for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class SimFleet(Fleet):
    """``n`` simulated devices (bench/transfersim.py: the agent's transfer code, no model runtime) in ``workers``
    processes of one event loop each; the same commands as :class:`Fleet`'s workers."""

    def __init__(self, n: int, broker, root: Path, key: Path, tag: str, keepalive: int | None = None,
                 workers: int = 2, link_kbps: float | None = None) -> None:
        self.ids = [device_id(tag, i) for i in range(n)]
        workers = max(1, min(workers, n))
        sizes = [n // workers + (k < n % workers) for k in range(workers)]
        sim = Path(__file__).with_name("transfersim.py")
        self.procs = [subprocess.Popen(
            [sys.executable, str(sim), "--broker", f"127.0.0.1:{broker.port}", "--devices", str(size),
             "--first", str(sum(sizes[:k])), "--tag", tag, "--state", str(root), "--key", str(key), "--prefix", PREFIX,
             *(["--keepalive", str(keepalive)] if keepalive is not None else []),
             *(["--link-kbps", str(link_kbps)] if link_kbps else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k, size in enumerate(sizes)]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                self.stop()
                raise SystemExit(f"a simulator worker of {tag} failed (exit {p.wait()})")


def state_root(prefix: str) -> Path:
    """Where the devices keep their downloads: memory (/dev/shm) where there is one, so that 1,000 devices' fsyncs
    measure the protocol, not this machine's disk."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


class CpuClock:
    """CPU seconds (user + system) the broker, the devices' processes and this one (the host) spent between
    :meth:`start` and :meth:`stop`, and the broker's peak resident memory, sampled every 0.2 s: on two shared cores
    they say what bounds the wall time."""

    def __init__(self, broker_pid: int, device_pids: list[int]) -> None:
        import psutil

        self.procs = {"broker": [psutil.Process(broker_pid)], "devices": [psutil.Process(p) for p in device_pids],
                      "host": [psutil.Process()]}
        self.broker_rss = 0
        self._done = threading.Event()

    def _cpu(self) -> dict[str, float]:
        return {k: sum(p.cpu_times().user + p.cpu_times().system for p in ps) for k, ps in self.procs.items()}

    def _sample(self) -> None:
        while not self._done.wait(0.2):  # a sampling interval, not a synchronisation
            self.broker_rss = max(self.broker_rss, self.procs["broker"][0].memory_info().rss)

    def start(self) -> "CpuClock":
        self.t0 = self._cpu()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def stop(self) -> dict:
        self._done.set()
        self._sampler.join()
        t1 = self._cpu()
        return {**{f"{k}_cpu_s": round(t1[k] - self.t0[k], 2) for k in t1},
                "broker_peak_rss_mb": round(self.broker_rss / 2 ** 20, 1)}


def row(n: int, mode: str, art, got, wall: float, downloaded: dict[str, float], drops: dict | None = None,
        fleet_kind: str = "agents") -> dict:
    s = got.summary()
    out = {"devices": n, "mode": mode, "fleet": fleet_kind, "activated": sum(r.status == "activated" for r in got),
           "artifact_bytes": art.size_bytes, "egress_bytes": got.egress_bytes,
           "egress_x_artifact": round(got.egress_bytes / art.size_bytes, 3),
           "broadcast_bytes": s["broadcast_bytes"], "repair_bytes": s["repair_bytes"],
           "rebroadcast_chunks": s.get("rebroadcast_chunks"), "deferred_chunks": s.get("deferred_chunks"),
           "in_flight_chunks": s.get("in_flight_chunks"),
           "wall_s": round(wall, 2),
           "download_s": round(max(downloaded.values()), 2) if len(downloaded) == n else None,
           "broadcast_s": got.broadcast.seconds if got.broadcast else None,
           "subscribe_wait_s": got.broadcast.waited_s if got.broadcast else None,
           "subscribed": got.broadcast.subscribed if got.broadcast else None,
           # where the devices that did not activate stood: their result, and the last state they reported
           "not_activated": dict(sorted(Counter(f"{r.status}/{r.states[-1] if r.states else 'none'}"
                                                for r in got if r.status != "activated").items()))}
    if drops is not None:
        gone = set(drops["dropped"])
        out.update({"dropped": len(gone), "dropped_back": len(drops["back"]), "drop_missed": len(drops["missed"]),
                    "dropped_activated": sum(r.status == "activated" for r in got if r.device_id in gone),
                    "dropped_repair_chunks": sum(r.chunks_served for r in got if r.device_id in gone),
                    "others_repair_chunks": sum(r.chunks_served for r in got if r.device_id not in gone)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,10,50", help="comma-separated fleet sizes")
    ap.add_argument("--modes", default="unicast,broadcast", help="unicast, broadcast, drop (needs --drop)")
    ap.add_argument("--drop", type=float, default=0.0,
                    help="a fraction of agents that drop off mid-transfer in an added round, drop (see above)")
    ap.add_argument("--drop-session", choices=("kept", "lost"), default="kept",
                    help="whether a dropped agent's broker session (what was queued for it) is lost")
    ap.add_argument("--agent-wait", type=float, help="the agents' first silence in seconds (see above)")
    ap.add_argument("--keepalive", type=int,
                    help="the agents' MQTT keep-alive in seconds (30): a starved agent past 1.5x it is disconnected")
    ap.add_argument("--sim", action="store_true",
                    help="simulated devices (bench/transfersim.py: the agent's transfer, no model runtime) instead of "
                         "agents")
    ap.add_argument("--sim-workers", type=int, default=2, help="processes the simulated devices share")
    ap.add_argument("--link-kbps", type=float,
                    help="with --sim: each device's downlink in kbit/s (default: loopback's speed)")
    ap.add_argument("--unicast-max", type=int, default=200,
                    help="larger fleets are broadcast only (unicast there is recorded as not run)")
    ap.add_argument("--host-agents", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--broker-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = ap.parse_args()
    if args.host_agents:  # a worker: the agents only, no torch, no pipeline
        return host_agents(args)
    import torch
    from torch import nn

    from pipeline.broker import LocalBroker
    from pipeline.bundle import build_artifact, load_or_create
    from pipeline.export import export_model
    from pipeline.ota import deliver

    sizes = [int(x) for x in args.devices.split(",")]
    modes = args.modes.split(",") + (["drop"] if args.drop > 0 and "drop" not in args.modes.split(",") else [])
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    torch.manual_seed(0)  # ~1 MB of float32 weights that do not compress: every chunk is on the wire
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    path = export_model("onnx", model, (1, 8, 8), tmp / "model.onnx", 17)
    keys = tmp / "keys"
    load_or_create(keys)
    golden = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    version = iter(range(1, 10_000))

    def artifact():
        return build_artifact(path, tmp / "artifacts", name="scale-bench", version=next(version), target="rpi4",
                              runtime="onnxruntime", golden_inputs=golden, budgets={}, predicted={},
                              health={"runs": 5}, key_dir=keys)

    rows = []
    with LocalBroker("mosquitto", tmp / "broker") as broker:
        for n in sizes:
            t0 = time.perf_counter()
            if args.sim:
                fleet = SimFleet(n, broker.config, state_root(f"sim-{n}-"), keys / "signing.pub", f"s{n}",
                                 args.keepalive, args.sim_workers, args.link_kbps)
            else:
                fleet = Fleet(n, broker.config, tmp / f"state-{n}", keys / "signing.pub", f"n{n}", args.agent_wait,
                              args.keepalive)
            print(f"{n:>5} agents connected in {time.perf_counter() - t0:.1f} s", flush=True)
            ids = fleet.ids
            try:
                for mode in modes:
                    if mode == "unicast" and n > args.unicast_max:
                        rows.append({"devices": n, "mode": mode, "not_run": f"above --unicast-max {args.unicast_max}"})
                        continue
                    setting = {"unicast": "never", "broadcast": "always", "drop": "always"}[mode]
                    if mode == "drop":
                        if fleet.ask(f"drop {args.drop} {args.drop_session}") != ["armed"] * len(fleet.procs):
                            raise SystemExit("a worker did not arm its drop-offs")
                    art = artifact()
                    downloaded: dict[str, float] = {}
                    t0 = time.perf_counter()

                    def progress(state, r, t0=t0, downloaded=downloaded):
                        if state == "verifying":
                            downloaded.setdefault(r.device_id, time.perf_counter() - t0)

                    clock = CpuClock(broker.proc.pid, [p.pid for p in fleet.procs]).start()
                    got = deliver(broker.config, PREFIX, art, ids, 900, progress, broadcast=setting)
                    wall = time.perf_counter() - t0
                    cpu = clock.stop()
                    answers = [json.loads(a) for a in fleet.ask("report")] if mode == "drop" or args.sim else []
                    drops = None
                    if mode == "drop":
                        drops = {k: [x for a in answers for x in a.get(k, [])] for k in ("dropped", "back", "missed")}
                    rows.append(row(n, mode, art, got, wall, downloaded, drops, "simulated" if args.sim else "agents"))
                    rows[-1].update(cpu)
                    if args.sim:  # the simulators' own counts: connections lost, handling errors, refused frames
                        rows[-1]["sim"] = {k: sum(a["counts"][k] for a in answers) for k in answers[0]["counts"]}
                    r = rows[-1]
                    print(f"{n:>5} {mode:<9} {r['activated']}/{n} activated, egress {r['egress_x_artifact']}x, "
                          f"repairs {r['repair_bytes']} B, downloaded in {r['download_s']} s, {r['wall_s']} s in all"
                          + (f"; {r['dropped']} dropped off, {r['dropped_activated']} of them activated"
                             if drops is not None else "")
                          + (f"; not activated: {r['not_activated']}" if r["not_activated"] else ""), flush=True)
            finally:
                fleet.stop()
    # against today's delivery to one device (unicast), as the goal puts it
    one = next((r["wall_s"] for r in rows if r["devices"] == 1 and r["mode"] == "unicast" and "wall_s" in r), None)
    for r in rows:
        if "wall_s" in r:
            r["wall_x_one_device"] = round(r["wall_s"] / one, 2) if one else None
    result = {"artifact_bytes": rows[0]["artifact_bytes"] if rows else None, "chunk_size": 32 * 1024,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "machine": platform.machine()},
              "note": (f"simulated devices (bench/transfersim.py) in {args.sim_workers} processes" if args.sim else
                       f"real device agents, a thread each, in worker processes of at most {PER_PROCESS}")
                      + ", on one loopback Mosquitto; the host in the bench's own process",
              "options": {"sim": args.sim, "link_kbps": args.link_kbps, "drop": args.drop, "drop_session": args.drop_session, "agent_wait_s": args.agent_wait,
                          "keepalive_s": args.keepalive},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    cols = ["devices", "mode", "activated", "egress_bytes", "egress_x_artifact", "repair_bytes", "rebroadcast_chunks",
            "deferred_chunks", "download_s", "wall_s", "wall_x_one_device", "subscribe_wait_s", "broadcast_s",
            "dropped", "dropped_activated", "dropped_repair_chunks", "others_repair_chunks", "broker_cpu_s",
            "devices_cpu_s", "host_cpu_s", "broker_peak_rss_mb"]
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "-")).rjust(widths[c]) for c in cols) + (f"  ({r['not_run']})" if "not_run" in r
                                                                               else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
