"""Real-scale structured pruning and int8, side by side in one run.

    .venv/bin/python bench/realscale.py [--models mobilenetv2,resnet18,fresh-branchnet,fresh-densenet]
                                        [--cuts 2,3] [--json bench/results/realscale.json] [--no-speed]
                                        [--criterion l2] [--steps 1] [--baseline OLD_TREE]

Per model (random weights: the figures are about speed and cost, not accuracy):
- structured pruning to each MAC cut (``macs_reduction``, ``--criterion`` (l2), ``round_to: 8``, no
  fine-tuning), each in its own
  subprocess so that its wall time and peak RSS are its own (RSS includes the interpreter, torch and the model;
  ``rss_base_mb`` is the same process before the compression started);
- the achieved MAC cut (Torch-Pruning's counter), and the measured onnxruntime speedup (1 thread) over the dense
  model, divided by the MAC cut (goal >= 0.9);
- int8 (QDQ static, per-channel) of the dense model: ONNX size ratio (goal >= 3.9x) and speedup.
All variants of one model are timed in one interleaved comparison (``pipeline.profile.compare``): this VM's speed
drifts 1.4-2x, so only ratios taken in the same rounds are compared; the spread is the per-round min-max.

The two fresh architectures below were written for this benchmark and never tuned: BatchNorm, two-branch
concatenations, depthwise convolutions and residual adds, the structures the dependency graph must follow.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds profile.py, which would shadow the standard library's `profile`: put the repo first instead
# (a worker compressing with another tree's code, --baseline, puts that tree first)
_ROOT = sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv else str(Path(__file__).resolve().parent.parent)
sys.path[0] = _ROOT

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class Branches(nn.Module):
    """A 1x1 and a 3x3-then-depthwise-5x5 branch, concatenated, fused by a 1x1, added to the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = cbr(c, c // 2, 1)
        self.b = nn.Sequential(cbr(c, c // 2, 3), cbr(c // 2, c // 2, 5, groups=c // 2))
        self.fuse = cbr(c, c, 1, act=False)

    def forward(self, x):
        return torch.relu(x + self.fuse(torch.cat([self.a(x), self.b(x)], 1)))


class Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        h = cin * expand
        self.body = nn.Sequential(cbr(cin, h, 1), cbr(h, h, 3, stride, groups=h), cbr(h, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class BranchNet(nn.Module):
    """Fresh architecture 1: a concatenated two-branch stem, inverted residuals, a branch block per stage."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem3, self.stem5 = cbr(3, 16, 3, 2), cbr(3, 16, 5, 2)
        stages, cin = [], 32
        for c, stride in ((48, 2), (96, 2), (160, 2)):
            stages += [Inverted(cin, c, stride), Inverted(c, c, 1), Branches(c)]
            cin = c
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(cbr(cin, 512, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.head(self.stages(torch.cat([self.stem3(x), self.stem5(x)], 1)))


class DenseUnit(nn.Module):
    """Fresh architecture 2's unit (DenseNet-style growth): 1x1 -> depthwise 3x3 -> 1x1 makes ``growth`` new
    channels, concatenated to the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(cin, 2 * growth, 1), cbr(2 * growth, 2 * growth, 3, groups=2 * growth),
                                  cbr(2 * growth, growth, 1))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """Fresh architecture 2: dense (concatenating) units, 1x1 transitions, strided depthwise downsampling and an
    inverted residual (residual add) per stage."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers, cin = [cbr(3, 32, 3, 2)], 32
        for c, growth in ((64, 24), (128, 32), (256, 48)):
            layers += [cbr(cin, cin, 3, 2, groups=cin, act=False), DenseUnit(cin, growth),
                       DenseUnit(cin + growth, growth), cbr(cin + 2 * growth, c, 1), Inverted(c, c, 1)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    from pipeline.models import MODELS
    from pipeline.models.zoo import DEFAULT_INPUT_SHAPES

    torch.manual_seed(0)
    if name == "fresh-branchnet":
        return BranchNet(10), (3, 160, 160), 10
    if name == "fresh-densenet":
        return DenseNet(10), (3, 160, 160), 10
    shape = DEFAULT_INPUT_SHAPES[name]
    return MODELS.get(name)(shape, 1000), shape, 1000


def synthetic(shape: tuple[int, ...], classes: int, n: int = 8):
    """Random images: ``n`` to score channels with, 8 to evaluate on (``evaluate`` runs batches of up to 512, whose
    activations at 224x224 would otherwise dominate the compression's RSS)."""
    from pipeline.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return Dataset("random", x, y, x[:8], y[:8], classes)


def maxrss_mb() -> float:
    """This process's peak RSS (VmHWM: since exec; ru_maxrss would carry the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, cut: float, out: Path, criterion: str, steps: int) -> dict:
    """One structured compression, in this process; returns its figures (the parent reads them as JSON)."""
    from pipeline.compress import CompressContext, build_recipe, run_recipe
    from pipeline.config import CompressStep, TrainConfig

    model, shape, classes = build(name)
    model.eval()
    data = synthetic(shape, classes, 64 if criterion in ("taylor", "hessian") else 8)
    ctx = CompressContext(data, TrainConfig(), progress=lambda m: log(f"{name} {cut:g}x: {m}"))
    [method] = build_recipe([CompressStep(method="structured", macs_reduction=cut, round_to=8, finetune_epochs=0,
                                            criterion=criterion, steps=steps)])
    base = maxrss_mb()
    t0 = time.perf_counter()
    [report] = run_recipe(model, [method], ctx)
    wall = time.perf_counter() - t0
    peak = maxrss_mb()
    torch.save(model, out)
    return {"model": name, "cut": cut, "criterion": criterion, "steps": steps, "wall_s": round(wall, 1),
            "rss_peak_mb": round(peak), "rss_base_mb": round(base),
            "mac_ratio": report.extra["mac_ratio"], "macs_before": report.extra["macs_before"],
            "macs_after": report.extra["macs_after"], "ratio": report.extra.get("ratio")}


def compress(name: str, cut: float, out: Path, timeout: float, criterion: str, steps: int,
             root: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--cut", str(cut), "--out", str(out), "--criterion", criterion,
           "--steps", str(steps), *(["--root", str(root)] if root else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "cut": cut, "error": f"timed out after {timeout:.0f} s"}
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        return {"model": name, "cut": cut, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, shape: tuple[int, ...], dense: nn.Module, pruned: dict[str, Path], tmp: Path,
            budget_s: float) -> dict:
    """Export every variant, quantize the dense one to int8, time them all in one interleaved comparison."""
    from pipeline.export import QUANTIZERS, export_model, minify
    from pipeline.profile.compare import Adaptive, compare_latency

    paths = {"dense": export_model("onnx", dense, shape, tmp / f"{name}-dense.onnx", 17)}
    for variant, pt in pruned.items():
        model = torch.load(pt, weights_only=False).eval()
        paths[variant] = export_model("onnx", model, shape, tmp / f"{name}-{variant}.onnx", 17)
    calibration = np.random.default_rng(1).random((16, *shape), dtype=np.float32)
    q = QUANTIZERS.get("int8-static")(paths["dense"], tmp / f"{name}-int8.onnx", calibration)
    minify(q)
    paths["int8"] = q
    t0 = time.perf_counter()
    rows = compare_latency(list(paths.values()), shape, threads=1, adaptive=Adaptive(budget_s=budget_s))
    timing = {key: {**row, "compare_s": round(time.perf_counter() - t0, 1)} for key, row in zip(paths, rows)}
    sizes = {key: p.stat().st_size for key, p in paths.items()}
    return {"timing": timing, "sizes": sizes}


def table(results: list[dict]) -> str:
    head = (f"{'model':18} {'variant':8} {'MAC cut':>8} {'speedup':>8} {'spread':>13} {'sp/cut':>7} "
            f"{'size x':>7} {'wall s':>7} {'RSS MB':>7} {'base MB':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        for v in r["variants"]:
            t = v.get("timing") or {}
            spread = t.get("speedup_spread")
            lines.append(
                f"{r['model']:18} {v['variant']:8} {_f(v.get('mac_ratio'), 2):>8} {_f(t.get('speedup'), 2):>8} "
                f"{(f'{spread[0]:.2f}-{spread[1]:.2f}' if spread else '-'):>13} {_f(v.get('speedup_per_cut'), 2):>7} "
                f"{_f(v.get('size_ratio'), 2):>7} {_f(v.get('wall_s'), 1):>7} {_f(v.get('rss_peak_mb'), 0):>7} "
                f"{_f(v.get('rss_base_mb'), 0):>7}" + (f"  {v['error']}" if v.get("error") else ""))
    return "\n".join(lines)


def _f(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,resnet18,fresh-branchnet,fresh-densenet")
    ap.add_argument("--cuts", default="2,3")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-speed", action="store_true", help="compressions only (wall time, RSS, MAC cut)")
    ap.add_argument("--criterion", default="l2", help="structured importance criterion (taylor: 64 samples)")
    ap.add_argument("--steps", type=int, default=1, help="structured steps")
    ap.add_argument("--budget", type=float, default=60, help="seconds the interleaved timing of a model may take")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per compression")
    ap.add_argument("--baseline", type=Path, help="also compress with the pipeline code of this tree (a copy from "
                    "before a change): variants '<cut>x-base', timed in the same rounds")
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cut", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.cut, args.out, args.criterion, args.steps)))
        return
    cuts = [float(c) for c in args.cuts.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models.split(","):
            dense, shape, _ = build(name)
            dense.eval()
            variants, pruned = [{"variant": "dense"}], {}
            for cut in cuts:
                for root, suffix in ((None, ""), *([(args.baseline, "-base")] if args.baseline else [])):
                    variant = f"{cut:g}x{suffix}"
                    log(f"{name}: structured {variant} (subprocess)")
                    pt = tmp / f"{name}-{variant}.pt"
                    row = compress(name, cut, pt, args.timeout, args.criterion, args.steps, root)
                    log(f"{name}: structured {variant}: {row}")
                    variants.append({"variant": variant, **row})
                    if "error" not in row:
                        pruned[variant] = pt
            variants.append({"variant": "int8"})
            if not args.no_speed:
                log(f"{name}: export, int8, interleaved timing of {len(pruned) + 2} variants")
                m = measure(name, shape, dense, pruned, tmp, args.budget)
                for v in variants:
                    t = m["timing"].get(v["variant"])
                    if t is None:
                        continue
                    v["timing"] = t
                    v["size_ratio"] = round(m["sizes"]["dense"] / m["sizes"][v["variant"]], 3)
                    if v.get("mac_ratio"):
                        v["speedup_per_cut"] = round(t["speedup"] / v["mac_ratio"], 3)
            results.append({"model": name, "input_shape": list(shape), "variants": variants})
            print(table(results[-1:]), flush=True)
    print()
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "cuts": cuts, "criterion": args.criterion,
                                         "baseline": str(args.baseline) if args.baseline else None,
                                         "steps": args.steps, "torch_threads": torch.get_num_threads()},
                                        indent=2))


if __name__ == "__main__":
    main()
