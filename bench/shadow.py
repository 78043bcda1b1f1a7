"""The wall time of a rollout with a shadow stage on local agents: shadow -> canary -> rollout, against canary ->
rollout alone, with applications calling every agent's inference API without pause.

    .venv/bin/python bench/shadow.py [--agents 4] [--min-samples 200] [--sample 0.1] [--json]
                                     [--out bench/results/shadow.json]

A local Mosquitto and ``--agents`` local agents (one intra-op thread each) serve a small MLP (v1); one client
thread per agent calls its API in a loop. Then, in one run:
- v2 (v1's weights moved by 0.1% noise: the same top-1) rolls out without a shadow stage;
- v3 (likewise) rolls out with ``rollout.shadow`` on the canaries (``devices: canary``), then v4 on every device
  (``devices: all``): each stage's seconds (the shadow job's delivery, the samples, the canaries, the rest), the
  shadow stage's share of the whole, and the requests the applications sent meanwhile (none may fail).
How long the samples take is the traffic's doing: ``min_samples / (sample * requests per second)`` at least, and the
agent reports when asked, every ``report_every_s`` (1 s here). The latency ratio is not judged (``max_latency_ratio:
null``) but printed: the agent times the candidate at nice 19 on one thread, which on a saturated host measures the
scheduler more than the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

PREFIX = "edgefleet"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Traffic:
    """One client thread per socket calling without pause; answers and failures counted."""

    def __init__(self, sockets: list[str], x: np.ndarray) -> None:
        self.sockets, self.x = sockets, x
        self.answers, self.failures = 0, 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in sockets]

    def _run(self, socket_path: str) -> None:
        from device_agent.client import Client

        with Client(socket_path, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    client.infer(self.x)
                    ok = True
                except Exception:  # noqa: BLE001 - counted
                    ok = False
                with self._lock:
                    self.answers += ok
                    self.failures += not ok

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def model_versions(tmp: Path) -> list[Path]:
    from pipeline.export import export_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    out = []
    for i in range(4):
        m = copy.deepcopy(base)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3 * p.std())
        out.append(export_model("onnx", m, (1, 8, 8), tmp / f"v{i}.onnx", 17))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--min-samples", type=int, default=200)
    ap.add_argument("--sample", type=float, default=0.1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shadow.json"))
    args = ap.parse_args()

    from pipeline.broker import LocalBroker
    from pipeline.bundle import build_artifact, load_or_create, shadow_artifact
    from pipeline.ota import LocalFleet, deliver
    from pipeline.ota.rollout import RolloutPolicy, rollout
    from pipeline.ota.shadow import ShadowPolicy

    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    keys = tmp / "keys"
    load_or_create(keys)
    models = model_versions(tmp)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)

    def artifact(i: int, version: int):
        golden = np.random.default_rng(version).random((3, 1, 8, 8), dtype=np.float32)
        return build_artifact(models[i], tmp / "artifacts", name="mlp", version=version, target="host",
                              runtime="onnxruntime", golden_inputs=golden, budgets={}, predicted={},
                              health={"runs": 5}, key_dir=keys)

    runs: list[dict[str, Any]] = []
    with LocalBroker("mosquitto", tmp / "broker") as broker, \
            LocalFleet(tmp / "devices", broker.config, "host", args.agents, keys / "signing.pub", PREFIX,
                       threads=1) as fleet:
        devices = fleet.device_ids
        log(f"{len(devices)} local agents; v1 to all")
        assert all(r.status == "activated" for r in deliver(broker.config, PREFIX, artifact(0, 1), devices, 60))
        with Traffic([str(fleet.socket_path(d)) for d in devices], x) as traffic:
            for i, (label, shadow_on) in enumerate([("no shadow", None), ("shadow: canary", "canary"),
                                                    ("shadow: all", "all")], start=1):
                art = artifact(i, i + 1)
                shadow = ShadowPolicy(sample=args.sample, min_samples=args.min_samples, devices=shadow_on,
                                      max_latency_ratio=None, report_every_s=1.0, timeout_s=300) \
                    if shadow_on else None
                policy = RolloutPolicy(canary_fraction=0.25, shadow=shadow)
                job = shadow_artifact(art, shadow.leaf(), keys) if shadow else None
                before = (traffic.answers, traffic.failures)
                t0 = time.perf_counter()
                result = rollout(broker.config, PREFIX, art, devices, 120, policy, note=log, shadow=job)
                wall = time.perf_counter() - t0
                assert not result.aborted, result.reason
                assert all(r.status == "activated" for r in result.results)
                sh = result.shadow
                run = {"run": label, "version": art.version, "wall_s": round(wall, 2), **result.timings,
                       "shadow_deliver_s": sh.timings.get("deliver") if sh else None,
                       "shadow_samples_s": sh.timings.get("samples") if sh else None,
                       "shadow_devices": len(sh.devices) if sh else 0,
                       "samples": [d.figures()["samples"] for d in sh.devices] if sh else [],
                       # candidate p95 / active p95 per device: what max_latency_ratio would be held to
                       "latency_ratio": [d.figures()["latency_ratio"] for d in sh.devices] if sh else [],
                       "requests": traffic.answers - before[0], "failed": traffic.failures - before[1]}
                run["requests_per_s"] = round(run["requests"] / wall, 1)
                runs.append(run)
                log(f"{label}: {wall:.1f} s ({result.timings})")
    result = {"agents": args.agents, "min_samples": args.min_samples, "sample": args.sample,
              "model": "MLP 64-64-10 (onnxruntime, 1 thread)", "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.agents} local agents, shadow at sample {args.sample:g} until {args.min_samples} compared per device")
    print(f"{'run':16s} {'total s':>8s} {'shadow s':>9s} {'(job':>6s} {'samples)':>9s} {'canary s':>9s} "
          f"{'rest s':>7s} {'req/s':>8s} {'failed':>7s}")
    for r in runs:
        def cell(v, width):
            return f"{v:{width}.2f}" if isinstance(v, (int, float)) else f"{'-':>{width}s}"
        print(f"{r['run']:16s} {r['wall_s']:8.2f} {cell(r.get('shadow'), 9)} {cell(r['shadow_deliver_s'], 6)} "
              f"{cell(r['shadow_samples_s'], 9)} {cell(r.get('canary'), 9)} {cell(r.get('rollout'), 7)} "
              f"{r['requests_per_s']:8.1f} {r['failed']:7d}")
    for r in runs:
        if r["latency_ratio"]:
            print(f"{r['run']}: candidate p95 / active p95 per device: "
                  f"{', '.join(f'{x:.1f}' for x in r['latency_ratio'] if x is not None)} (not judged here)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
