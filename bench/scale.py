"""Fleet scale: host egress and wall time of one ~1 MB model to N agents, unicast vs broadcast, side by side.

    .venv/bin/python bench/scale.py [--devices 1,10,50] [--out bench/results/scale.json]

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
- broadcast_s: the broadcast's own publishing time; repair_bytes: what devices asked for on their own.
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


def host_agents(args) -> None:
    """A worker: run agents ``--host-agents FIRST:COUNT``, say ``ready`` once all are connected, stop at EOF."""
    first, count = (int(x) for x in args.host_agents.split(":"))
    broker = BrokerConfig(host="127.0.0.1", port=args.broker_port)
    agents = start_agents(range(first, first + count), broker, Path(args.state), Path(args.key), args.tag)
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    stop_agents(agents)


class Fleet:
    """``n`` agents in worker processes of at most PER_PROCESS; ``ids`` once every one is connected."""

    def __init__(self, n: int, broker, root: Path, key: Path, tag: str) -> None:
        self.ids = [device_id(tag, i) for i in range(n)]
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "--host-agents", f"{first}:{min(PER_PROCESS, n - first)}", "--tag", tag,
             "--state", str(root), "--key", str(key), "--broker-port", str(broker.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for first in range(0, n, PER_PROCESS)]
        for p in self.procs:  # each worker's own line: no polling
            if p.stdout.readline().strip() != "ready":
                self.stop()
                raise SystemExit(f"a worker of {tag} failed (exit {p.wait()})")

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


def row(n: int, mode: str, art, got, wall: float, downloaded: dict[str, float]) -> dict:
    s = got.summary()
    return {"devices": n, "mode": mode, "activated": sum(r.status == "activated" for r in got),
            "artifact_bytes": art.size_bytes, "egress_bytes": got.egress_bytes,
            "egress_x_artifact": round(got.egress_bytes / art.size_bytes, 3),
            "broadcast_bytes": s["broadcast_bytes"], "repair_bytes": s["repair_bytes"],
            "wall_s": round(wall, 2),
            "download_s": round(max(downloaded.values()), 2) if len(downloaded) == n else None,
            "broadcast_s": got.broadcast.seconds if got.broadcast else None,
            "subscribe_wait_s": got.broadcast.waited_s if got.broadcast else None,
            "subscribed": got.broadcast.subscribed if got.broadcast else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,10,50", help="comma-separated fleet sizes")
    ap.add_argument("--modes", default="unicast,broadcast", help="unicast, broadcast or both")
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
            fleet = Fleet(n, broker.config, tmp / f"state-{n}", keys / "signing.pub", f"n{n}")
            print(f"{n:>5} agents connected in {time.perf_counter() - t0:.1f} s", flush=True)
            ids = fleet.ids
            try:
                for mode in args.modes.split(","):
                    if mode == "unicast" and n > args.unicast_max:
                        rows.append({"devices": n, "mode": mode, "not_run": f"above --unicast-max {args.unicast_max}"})
                        continue
                    setting = {"unicast": "never", "broadcast": "always"}[mode]
                    art = artifact()
                    downloaded: dict[str, float] = {}
                    t0 = time.perf_counter()

                    def progress(state, r, t0=t0, downloaded=downloaded):
                        if state == "verifying":
                            downloaded.setdefault(r.device_id, time.perf_counter() - t0)

                    got = deliver(broker.config, PREFIX, art, ids, 900, progress, broadcast=setting)
                    rows.append(row(n, mode, art, got, time.perf_counter() - t0, downloaded))
                    r = rows[-1]
                    print(f"{n:>5} {mode:<9} {r['activated']}/{n} activated, egress {r['egress_x_artifact']}x, "
                          f"downloaded in {r['download_s']} s, {r['wall_s']} s in all", flush=True)
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
              "note": f"real device agents, a thread each, in worker processes of at most {PER_PROCESS}, on one loopback "
                      "Mosquitto; the host in the bench's own process",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    cols = ["devices", "mode", "activated", "egress_bytes", "egress_x_artifact", "repair_bytes", "download_s",
            "wall_s", "wall_x_one_device", "subscribe_wait_s", "broadcast_s"]
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "-")).rjust(widths[c]) for c in cols) + (f"  ({r['not_run']})" if "not_run" in r
                                                                               else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
