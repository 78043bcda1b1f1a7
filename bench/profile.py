"""Latency predictions against measurements on this host, over 30 variants that run for milliseconds.

    .venv/bin/python bench/profile.py [--quick] [--no-calibrate] [--budget 20] [--json]
                                      [--out bench/results/profile.json]

1. Calibrate ``host`` the way every device class is calibrated: ``pipeline targets calibrate --target host``
   ships the calibration suite to a local agent process over a local broker, the agent times it, the host fits
   the predictor (into a scratch targets directory, never the user's). ``--no-calibrate`` uses the calibration
   the targets directory already has.
2. Variants: MobileNetV2-224 (width 1.0 and 0.5), MobileNetV3-Small-224, ResNet-18 (224 and 160), a DS-CNN
   keyword spotter (49x10 MFCC), and two architectures written for this benchmark, never in any calibration
   suite (held out: a VGG-style net with 5x5 convolutions and max-pools at 128x128, and a net of grouped 1x1
   convolutions, depthwise 5x5, squeeze-and-excitation and residual adds at 160x160); each dense, structured
   2x (no fine-tuning: the figures are about speed, random weights), int8 static; the four largest also at 3x,
   two also int8 after the 2x cut.
3. Each variant's prediction for ``host``, against its latency measured here: the variants of one model are
   timed in one interleaved comparison (``pipeline.profile.compare``, adaptive rounds within ``--budget``
   seconds), each variant's median of round figures with its spread (min-max of the round figures) beside the
   error, error = (predicted - measured) / measured. A round's figure is the 10th percentile of its runs, the
   statistic the calibrating agent takes (``device_agent.suite_runner.round_figure_ms``): interference only adds
   time, and calibration and validation must measure alike.
4. The uncalibrated rpi4 predictions (published-anchored roofline) of the models with published Raspberry Pi 4
   figures, next to those figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds profile.py, which would shadow the standard library's `profile`: put the repo first instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

#: published Raspberry Pi 4 latencies (ms) the uncalibrated rpi4 prediction is set against; the sources are cited
#: in targets/rpi4.yaml (XNNPACK's README, RPi 4 ARM64 column, 4 threads; ncnn's benchmark table for ResNet-18)
PUBLISHED_RPI4 = {("mobilenetv2", "fp32"): (46.0, "XNNPACK"), ("mobilenetv3-small", "fp32"): (15.0, "XNNPACK"),
                  ("mobilenetv2", "int8"): (17.0, "XNNPACK"), ("resnet18", "fp32"): (176.18, "ncnn (Winograd)")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- held-out architectures

def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class VGGLite(nn.Module):
    """A 5x5 stride-2 stem, three stages of two 3x3 convolutions each closed by a max-pool, a 1x1, a classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        stages: list[nn.Module] = [cbr(3, 32, 5, 2)]
        cin = 32
        for c in (48, 96, 144):
            stages += [cbr(cin, c), cbr(c, c), nn.MaxPool2d(2)]
            cin = c
        self.body = nn.Sequential(*stages, cbr(cin, 192, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, classes))

    def forward(self, x):
        return self.head(self.body(x))


class GhostSE(nn.Module):
    """Blocks of a grouped 1x1 (4 groups), a depthwise 5x5, squeeze-and-excitation and a 1x1, added to the
    input; stride-2 blocks between stages; Hardswish."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            mid = cout * 2
            self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, groups=4, bias=False), nn.BatchNorm2d(mid),
                                        nn.Hardswish())
            self.dw = cbr(mid, mid, 5, stride, groups=mid, act=False)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, mid // 4, 1), nn.ReLU(),
                                    nn.Conv2d(mid // 4, mid, 1), nn.Hardsigmoid())
            self.project = cbr(mid, cout, 1, act=False)
            self.add = stride == 1 and cin == cout

        def forward(self, x):
            y = self.dw(self.expand(x))
            y = self.project(y * self.se(y))
            return x + y if self.add else y

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = [cbr(3, 16, 3, 2)]
        cin = 16
        for cout, stride in ((24, 2), (24, 1), (40, 2), (40, 1), (80, 2), (80, 1)):
            blocks.append(GhostSE.Block(cin, cout, stride))
            cin = cout
        self.body = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x):
        return self.head(self.body(x))


# --------------------------------------------------------------------------- variants

def models(quick: bool) -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...], bool, tuple[float, ...], bool]]:
    """(name, builder, input shape, held out, structured cuts, int8 of the 2x cut too)."""
    from pipeline.models import MODELS
    from pipeline.models import zoo  # noqa: F401  (registers the zoo)

    def zoo_model(name: str, shape: tuple[int, ...], classes: int = 1000, **kw) -> Callable[[], nn.Module]:
        return lambda: MODELS.get(name)(shape, classes, **kw)

    all_ = [
        ("mobilenetv2", zoo_model("mobilenetv2", (3, 224, 224)), (3, 224, 224), False, (2.0, 3.0), True),
        ("mobilenetv2-0.5", zoo_model("mobilenetv2", (3, 224, 224), width=0.5), (3, 224, 224), False, (2.0,), False),
        ("mobilenetv3-small", zoo_model("mobilenetv3-small", (3, 224, 224)), (3, 224, 224), False, (2.0, 3.0), False),
        ("resnet18", zoo_model("resnet18", (3, 224, 224)), (3, 224, 224), False, (2.0, 3.0), True),
        ("resnet18-160", zoo_model("resnet18", (3, 160, 160)), (3, 160, 160), False, (2.0,), False),
        ("ds-cnn", zoo_model("ds-cnn", (1, 49, 10), 12), (1, 49, 10), False, (2.0,), False),
        ("fresh-vgglite", lambda: VGGLite(), (3, 128, 128), True, (2.0, 3.0), False),
        ("fresh-ghostse", lambda: GhostSE(), (3, 160, 160), True, (2.0,), False),
    ]
    return [m for m in all_ if m[0] in ("mobilenetv3-small", "fresh-ghostse")] if quick else all_


def synthetic(shape: tuple[int, ...], classes: int, n: int = 8):
    from pipeline.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return Dataset("random", x, y, x, y, classes)


def build_variants(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], cuts: tuple[float, ...],
                   int8_cut: bool, tmp: Path) -> list[dict[str, Any]]:
    """Export the dense model, each structured cut and the int8 files; a variant that cannot be made is a row with
    its error (the others go on)."""
    import copy

    from pipeline.compress import CompressContext, build_recipe, run_recipe
    from pipeline.compress.structured import count_macs
    from pipeline.config import CompressStep, TrainConfig
    from pipeline.export import QUANTIZERS, export_model, minify

    torch.manual_seed(0)
    dense = make().eval()
    classes = int(dense(torch.zeros(1, *shape)).shape[1])
    data = synthetic(shape, classes)
    calibration = np.random.default_rng(1).random((16, *shape), dtype=np.float32)
    example = torch.zeros(1, *shape)
    out = [{"variant": "dense", "path": export_model("onnx", dense, shape, tmp / f"{name}.onnx", 17),
            "macs": count_macs(dense, example)[0]}]
    for cut in cuts:
        try:
            model = copy.deepcopy(dense)
            step = CompressStep(method="structured", macs_reduction=cut, round_to=8, finetune_epochs=0)
            run_recipe(model, build_recipe([step]), CompressContext(data, TrainConfig()))
            out.append({"variant": f"{cut:g}x", "macs": count_macs(model, example)[0],
                        "path": export_model("onnx", model.eval(), shape, tmp / f"{name}-{cut:g}x.onnx", 17)})
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a row, not the end of the run
            out.append({"variant": f"{cut:g}x", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
    for src in [out[0]] + ([v for v in out if v["variant"] == "2x" and "path" in v] if int8_cut else []):
        label = "int8" if src["variant"] == "dense" else f"{src['variant']}-int8"
        try:
            q = QUANTIZERS.get("int8-static")(src["path"], tmp / f"{name}-{label}.onnx", calibration)
            out.append({"variant": label, "path": minify(q), "macs": src["macs"]})
        except Exception as exc:  # noqa: BLE001
            out.append({"variant": label, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
    return out


# --------------------------------------------------------------------------- steps

def calibrate_host(targets_dir: Path, scale: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline.cli", "targets", "calibrate", "--target", "host", "--json",
           *(["--scale", scale] if scale else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EDGEFLEET_TARGETS_DIR":
                                                                    str(targets_dir)}, timeout=3600)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        sys.exit(f"calibration failed ({wall} s):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "report": json.loads(proc.stdout)}


def measure(variants: list[dict[str, Any]], shape: tuple[int, ...], threads: int, budget_s: float) -> None:
    from pipeline.profile.compare import Adaptive, compare_latency

    timed = [v for v in variants if "path" in v]
    rows = compare_latency([v["path"] for v in timed], shape, threads=threads, adaptive=Adaptive(budget_s=budget_s))
    for v, row in zip(timed, rows):
        v.update(measured_ms=row["latency_ms"], spread_ms=row["latency_spread_ms"], rounds=row["rounds"])


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    errors = np.array([abs(r["error_pct"]) for r in rows if "error_pct" in r])
    if not len(errors):
        return {"variants": 0}
    return {"variants": int(len(errors)), "within_10pct": round(float((errors <= 10).mean()), 3),
            "within_20pct": round(float((errors <= 20).mean()), 3),
            "median_abs_error_pct": round(float(np.median(errors)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile.json"))
    ap.add_argument("--quick", action="store_true", help="two models, short comparisons (a smoke run)")
    ap.add_argument("--no-calibrate", action="store_true", help="use the targets directory's host calibration")
    ap.add_argument("--scale", default=None, help="passed to `pipeline targets calibrate --scale`")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of interleaved timing per model")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    calibration = None
    if not args.no_calibrate:
        os.environ["EDGEFLEET_TARGETS_DIR"] = str(scratch / "targets")
        log("calibrating host through a local agent (pipeline targets calibrate --target host)")
        calibration = calibrate_host(scratch / "targets", args.scale)
        log(f"calibrated in {calibration['wall_s']} s")

    from pipeline.profile import predict_model
    from pipeline.targets import load_target

    host, rpi4 = load_target("host"), load_target("rpi4")
    threads = max(1, min(host.cpu.cores, os.cpu_count() or 1))
    rows: list[dict[str, Any]] = []
    published: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name, make, shape, held_out, cuts, int8_cut in models(args.quick):
        log(f"{name}: build {1 + len(cuts) + 1 + int8_cut} variants")
        variants = build_variants(name, make, shape, cuts, int8_cut, scratch)
        for v in variants:
            if "path" in v:
                p = predict_model(v["path"], host)
                v.update(predicted_ms=p["latency_ms"], basis=p["basis"])
        log(f"{name}: interleaved timing ({args.budget:g} s)")
        measure(variants, shape, threads, 3.0 if args.quick else args.budget)
        for v in variants:
            row = {"model": name, "held_out": held_out, "input_shape": list(shape),
                   **{k: val for k, val in v.items() if k != "path"}}
            if "measured_ms" in v:
                row["error_pct"] = round(100 * (v["predicted_ms"] - v["measured_ms"]) / v["measured_ms"], 2)
            rows.append(row)
            key = (name, {"dense": "fp32", "int8": "int8"}.get(v["variant"], ""))
            if key in PUBLISHED_RPI4 and "path" in v:
                figure, source = PUBLISHED_RPI4[key]
                predicted = predict_model(v["path"], rpi4)
                published.append({"model": name, "precision": key[1], "predicted_ms": predicted["latency_ms"],
                                  "published_ms": figure, "source": source,
                                  "ratio": round(predicted["latency_ms"] / figure, 3), "basis": predicted["basis"]})
    result = {"host": host.description, "threads": threads, "calibration": calibration, "rows": rows,
              "all": summary(rows), "held_out": summary([r for r in rows if r["held_out"]]),
              "zoo": summary([r for r in rows if not r["held_out"]]), "rpi4_published": published,
              "wall_s": round(time.perf_counter() - t0, 1), "quick": args.quick}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'model':18s} {'variant':9s} {'MMACs':>8s} {'predicted':>10s} {'measured':>9s} {'spread':>17s} "
          f"{'error':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:18s} {r['variant']:9s} error: {r['error']}")
            continue
        lo, hi = r["spread_ms"]
        print(f"{r['model'] + (' *' if r['held_out'] else ''):18s} {r['variant']:9s} {r['macs'] / 1e6:8.1f} "
              f"{r['predicted_ms']:10.3f} {r['measured_ms']:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>17s} "
              f"{r['error_pct']:+6.1f}%")
    print("(* held out: written for this benchmark, in no calibration suite)")
    for label in ("all", "zoo", "held_out"):
        s = result[label]
        if s["variants"]:
            print(f"{label:9s}: {s['within_10pct']:.0%} within 10%, {s['within_20pct']:.0%} within 20%, median "
                  f"|error| {s['median_abs_error_pct']}% over {s['variants']} variants")
    print(f"basis: {rows[0].get('basis', '-')}")
    print("\nrpi4, uncalibrated, against published figures")
    for p in published:
        print(f"  {p['model']:18s} {p['precision']}: predicted {p['predicted_ms']:7.1f} ms, published "
              f"{p['published_ms']:7.1f} ms ({p['source']}): {p['ratio']:.2f}x")
    if calibration:
        fit = calibration["report"].get("kernel_fit") or {}
        blocks = {p: (e or {}).get("block") for p, e in (fit.get("block") or {}).items()}
        print(f"\ncalibration: {calibration['wall_s']} s; {fit.get('kernels')} kernels, channel block {blocks}; "
              f"fit on its {fit.get('models')} models: median |error| {fit.get('median_abs_error_pct')}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
