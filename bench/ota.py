"""OTA fan-out benchmark: one >= 5 MB artifact to 50 agents through Mosquitto on loopback.

    .venv/bin/python bench/ota.py [--devices 50] [--out bench/results/ota.json]

The agents run in this process (one thread each, each with its own MQTT session and state directory),
as real device agents do: verify, download in chunks, fsync, install, health-check, activate.
- wall_s: the delivery to all devices; wall_s_one_device: the same artifact to one agent (same run);
- wire_ratio: chunk payload bytes published by the host / (artifact bytes x devices): 1.0 is perfect;
- resent_chunks_after_cut: one agent's connection is cut (socket shut, no DISCONNECT) at 50% of its
  download; the chunks the host had to send twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from device_agent.agent import Agent  # noqa: E402
from device_agent.config import AgentConfig  # noqa: E402
from pipeline.bundle import build_artifact, load_or_create  # noqa: E402
from pipeline.export import export_model  # noqa: E402
from pipeline.broker import LocalBroker
from pipeline.ota import deliver  # noqa: E402

PREFIX = "edgefleet"


def start_agents(n: int, broker, root: Path, key: Path, tag: str) -> list[tuple[Agent, threading.Thread]]:
    out = []
    for i in range(n):
        cfg = AgentConfig(device_id=f"{tag}-{i:03d}", target="rpi4", state_dir=root / f"{tag}-{i:03d}",
                          trusted_keys=(key,), broker=broker, topic_prefix=PREFIX, benchmark_runs=5, threads=1)
        agent = Agent(cfg)
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        out.append((agent, t))
    deadline = time.monotonic() + 60
    while not all(a.link.connected.is_set() for a, _ in out):
        if time.monotonic() > deadline:
            raise SystemExit("agents did not connect")
        time.sleep(0.05)
    return out


def stop_agents(agents) -> None:
    for a, _ in agents:
        a.stop()
    for _, t in agents:
        t.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ota.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ota-"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1152), nn.ReLU(), nn.Linear(1152, 1024), nn.ReLU(),
                          nn.Linear(1024, 10)).eval()
    path = export_model("onnx", model, (1, 8, 8), tmp / "model.onnx", 17)
    keys = tmp / "keys"
    load_or_create(keys)
    golden = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)

    def artifact(version: int):
        return build_artifact(path, tmp / "artifacts", name="ota-bench", version=version, target="rpi4",
                              runtime="onnxruntime", golden_inputs=golden, budgets={}, predicted={},
                              health={"runs": 5}, key_dir=keys)

    results = {}
    with LocalBroker("mosquitto", tmp / "broker") as broker:
        art = artifact(1)
        print(f"artifact: {art.size_bytes:,} bytes, {art.manifest.chunks} chunks, encoding {art.manifest.encoding}")

        one = start_agents(1, broker.config, tmp / "state", keys / "signing.pub", "solo")
        t0 = time.perf_counter()
        [r1] = deliver(broker.config, PREFIX, art, [one[0][0].cfg.device_id], 300)
        wall_one = time.perf_counter() - t0
        print(f"1 device: {r1.status} in {wall_one:.2f} s")

        # a cut at 50%: shut the agent's socket under it (no DISCONNECT, as when a link drops)
        art2 = artifact(2)
        agent = one[0][0]
        box = {}
        worker = threading.Thread(target=lambda: box.setdefault("r", deliver(broker.config, PREFIX, art2,
                                                                               [agent.cfg.device_id], 300)[0]))
        worker.start()
        while not agent._transfer or len(agent._transfer.download.have) < art2.manifest.chunks // 2:
            time.sleep(0.001)
        agent.link._client.socket().shutdown(socket.SHUT_RDWR)
        worker.join(300)
        cut = box["r"]
        print(f"cut at 50%: {cut.status}, {cut.chunks_resent} chunk(s) sent twice")
        stop_agents(one)

        fleet = start_agents(args.devices, broker.config, tmp / "state", keys / "signing.pub", "dev")
        art3 = artifact(3)
        t0 = time.perf_counter()
        many = deliver(broker.config, PREFIX, art3, [a.cfg.device_id for a, _ in fleet], 600)
        wall = time.perf_counter() - t0
        stop_agents(fleet)
        ok = sum(r.status == "activated" for r in many)
        wire = sum(r.bytes_sent for r in many)
        results = {
            "devices": args.devices, "artifact_bytes": art3.size_bytes, "chunks": art3.manifest.chunks,
            "activated": ok, "wall_s": round(wall, 2), "wall_s_one_device": round(wall_one, 2),
            "fanout_cost_ratio": round(wall / wall_one, 2),
            "wire_ratio": round(wire / (art3.size_bytes * args.devices), 4),
            "resent_chunks_total": sum(r.chunks_resent for r in many),
            "resent_chunks_after_cut": cut.chunks_resent, "cut_status": cut.status,
            "throughput_mb_s": round(art3.size_bytes * args.devices / wall / 1e6, 1),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k.ljust(width)}  {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
