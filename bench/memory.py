"""The agent's RSS with a model loaded, against the memory model the predictor uses (``pipeline.targets.Memory``).

    .venv/bin/python bench/memory.py [--quick] [--out bench/results/memory.json]

The variants of bench/profile.py (MobileNetV2 1.0/0.5, MobileNetV3-Small, ResNet-18 at 224 and 160, DS-CNN, two
held-out nets; dense, structured, int8). Each is loaded and run five times by onnxruntime in a fresh process that
imports the agent first, as the agent holds it; RSS before the session (the agent's modules without the
runtime), after loading, after running. A least-squares fit of the growth on (1, fp32 weights, int8 weights, peak
activations) gives the ``Memory`` defaults; the table sets the fitted model and the model in use (the target's
``memory`` section) against each measurement, as the share of the whole process's RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

CHILD = r'''
import sys, numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import device_agent.agent  # noqa: F401  (what the agent's process holds before any model)
from device_agent.runtimes import get_runtime
base = rss()
import onnxruntime  # noqa: F401
runtime = rss()
s = get_runtime("onnxruntime").load(sys.argv[1], 2)
loaded = rss()
i = s.inputs[0]
x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
for _ in range(5):
    s.run({i.name: x})
print(base, runtime, loaded, rss())
'''


def measure(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    base, runtime, loaded, ran = map(float, out.stdout.split())
    return {"agent_no_runtime_mb": base, "with_runtime_mb": runtime, "loaded_mb": loaded, "ran_mb": ran}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("bench_profile", Path(__file__).parent / "profile.py")
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    from pipeline.profile import analyse
    from pipeline.profile.predict import predict_memory_mb
    from pipeline.targets import load_target

    host = load_target("host")
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rows = []
    for name, make, shape, held_out, cuts, int8_cut in bp.models(args.quick):
        for v in bp.build_variants(name, make, shape, cuts, int8_cut, tmp):
            if "path" not in v:
                continue
            st = analyse(v["path"])
            rows.append({"model": name, "variant": v["variant"], "quantized": st.quantized,
                         "weights_mb": st.weight_bytes / 2**20, "activations_mb": st.peak_activation_bytes / 2**20,
                         "predicted_mb": round(predict_memory_mb(st, host), 1), **measure(v["path"])})
            print(f"{name} {v['variant']}: {rows[-1]['ran_mb']:.1f} MB", file=sys.stderr, flush=True)
    runtime = float(np.median([r["with_runtime_mb"] - r["agent_no_runtime_mb"] for r in rows]))
    a = np.array([[1, r["weights_mb"] * (not r["quantized"]), r["weights_mb"] * r["quantized"], r["activations_mb"]]
                  for r in rows])
    growth = np.array([r["ran_mb"] - r["agent_no_runtime_mb"] for r in rows])
    coef, *_ = np.linalg.lstsq(a, growth, rcond=None)
    base = float(np.median([r["agent_no_runtime_mb"] for r in rows]))
    for r, g in zip(rows, a @ coef):
        r["fitted_mb"] = round(base + float(g), 1)
        r["fitted_error"] = round((r["fitted_mb"] - r["ran_mb"]) / r["ran_mb"], 4)
        r["predicted_error"] = round((r["predicted_mb"] - r["ran_mb"]) / r["ran_mb"], 4)
    fit = {"agent_without_runtime_mb": round(base, 1), "runtime_import_mb": round(runtime, 1),
           "session_and_runtime_mb": round(float(coef[0]), 2), "weight_copies_fp32": round(float(coef[1]), 3),
           "weight_copies_int8": round(float(coef[2]), 3), "activation_factor": round(float(coef[3]), 3)}
    share = lambda key: float(np.mean([abs(r[key]) <= 0.15 for r in rows]))  # noqa: E731
    result = {"fit": fit, "rows": rows, "fitted_within_15pct": share("fitted_error"),
              "predicted_within_15pct": share("predicted_error"),
              "fitted_max_abs_error": max(abs(r["fitted_error"]) for r in rows),
              "predicted_max_abs_error": max(abs(r["predicted_error"]) for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'model':18s} {'variant':8s} {'weights':>8s} {'acts':>6s} {'measured':>9s} {'predicted':>10s} {'fitted':>8s}")
    for r in rows:
        print(f"{r['model']:18s} {r['variant']:8s} {r['weights_mb']:8.2f} {r['activations_mb']:6.2f} "
              f"{r['ran_mb']:9.1f} {r['predicted_mb']:7.1f} {100 * r['predicted_error']:+5.1f}% "
              f"{r['fitted_mb']:6.1f} {100 * r['fitted_error']:+5.1f}%")
    print(f"fit: {fit}")
    print(f"in use: {result['predicted_within_15pct']:.0%} within 15% (max {result['predicted_max_abs_error']:.1%}); "
          f"refitted: {result['fitted_within_15pct']:.0%} (max {result['fitted_max_abs_error']:.1%})")


if __name__ == "__main__":
    main()
