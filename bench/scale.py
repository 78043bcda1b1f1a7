"""Fleet scale: host egress and wall time of one ~1 MB model to N agents, unicast vs broadcast, side by side.

    .venv/bin/python bench/scale.py [--devices 1,10,50] [--out bench/results/scale.json]

For each N, N real device agents run in this process (a thread each, its own MQTT session and state directory:
verify, download, fsync, install, health-check, activate) on one loopback Mosquitto; the same agents take v(2k+1)
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
import platform  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from device_agent.agent import Agent  # noqa: E402
from device_agent.config import AgentConfig  # noqa: E402
from pipeline.broker import LocalBroker  # noqa: E402
from pipeline.bundle import build_artifact, load_or_create  # noqa: E402
from pipeline.export import export_model  # noqa: E402
from pipeline.ota import deliver  # noqa: E402

PREFIX = "edgefleet"


#: agents started at once; the next batch starts when these have connected (1,000 at once on two cores time out
#: their CONNACKs and reconnect in a storm)
BATCH = 25


def start_agents(n: int, broker, root: Path, key: Path, tag: str) -> list[tuple[Agent, threading.Thread]]:
    out = []
    for first in range(0, n, BATCH):
        batch = []
        for i in range(first, min(n, first + BATCH)):
            cfg = AgentConfig(device_id=f"{tag}-{i:04d}", target="rpi4", state_dir=root / f"{tag}-{i:04d}",
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


def row(n: int, mode: str, art, got, wall: float, downloaded: dict[str, float]) -> dict:
    s = got.summary()
    return {"devices": n, "mode": mode, "activated": sum(r.status == "activated" for r in got),
            "artifact_bytes": art.size_bytes, "egress_bytes": got.egress_bytes,
            "egress_x_artifact": round(got.egress_bytes / art.size_bytes, 3),
            "broadcast_bytes": s["broadcast_bytes"], "repair_bytes": s["repair_bytes"],
            "wall_s": round(wall, 2),
            "download_s": round(max(downloaded.values()), 2) if len(downloaded) == n else None,
            "broadcast_s": got.broadcast.seconds if got.broadcast else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,10,50", help="comma-separated fleet sizes")
    ap.add_argument("--modes", default="unicast,broadcast", help="unicast, broadcast or both")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = ap.parse_args()
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
            fleet = start_agents(n, broker.config, tmp / f"state-{n}", keys / "signing.pub", f"n{n}")
            ids = [a.cfg.device_id for a, _ in fleet]
            try:
                for mode in args.modes.split(","):
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
                stop_agents(fleet)
    one = {r["mode"]: r["wall_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        r["wall_x_one_device"] = round(r["wall_s"] / one[r["mode"]], 2) if one.get(r["mode"]) else None
    result = {"artifact_bytes": rows[0]["artifact_bytes"] if rows else None, "chunk_size": 32 * 1024,
              "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                          "machine": platform.machine()},
              "note": "agents are real device agents in one process (a thread each) on one loopback Mosquitto",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    cols = ["devices", "mode", "activated", "egress_bytes", "egress_x_artifact", "repair_bytes", "download_s",
            "wall_s", "wall_x_one_device", "broadcast_s"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).rjust(widths[c]) for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
