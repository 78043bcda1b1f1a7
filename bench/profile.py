"""Latency predictor accuracy on this host, and what int8 buys, in one run.

    .venv/bin/python bench/profile.py [--out bench/results/profile.json]

Needs targets/host.yaml (``pipeline targets calibrate``), calibrated on random models that are not
among the variants below. For each variant (zoo model x structured sparsity x quantization) the
host's predicted latency is set against its measured steady latency (lowest of several round
medians, onnxruntime, the host's thread count), normalised to the machine's speed at calibration
time by a reference model timed just before and after it (these shared machines drift between
speed levels for minutes; the raw figure and the factor are in the JSON too). The int8 section compares a trained small ResNet
with its int8 static (QDQ) version: size ratio, speedup (interleaved rounds) and accuracy drop.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds profile.py, which would shadow the standard library's `profile`: put the repo first instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.compress import CompressContext, build_recipe, run_recipe  # noqa: E402
from pipeline.config import CompressStep, TrainConfig  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.export import export_model, quantize_model  # noqa: E402
from pipeline.models import zoo  # noqa: E402
from pipeline.profile import kernel_predictor, predict_model  # noqa: E402
from pipeline.profile.compare import SpeedProbe, compare_latency, steady_latency_ms  # noqa: E402
from pipeline.targets import load_target  # noqa: E402
from pipeline.models.training import train  # noqa: E402

ZOO = {
    "small-cnn": lambda: zoo.small_cnn((1, 28, 28), 10),
    "lenet5": lambda: zoo.lenet5((1, 28, 28), 10),
    "resnet-small": lambda: zoo.resnet_small((1, 28, 28), 10, widths=(16, 32, 64)),
    "mobilenetv2-small": lambda: zoo.mobilenetv2_small((1, 28, 28), 10),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile.json"))
    ap.add_argument("--int8-only", action="store_true", help="re-run only the int8 section, keep the variants")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the variants; each one's median is used")
    args = ap.parse_args()
    host = load_target("host")
    threads = max(1, min(host.cpu.cores, os.cpu_count() or 1))
    data = load_dataset("mnist-5k", 4000, 1000, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    calib = data.x_train[:128]
    predictor = kernel_predictor(host)
    if predictor is None or predictor.reference_ms is None:
        sys.exit("host.kernels.json (packaged targets or the user directory) is missing or predates the speed "
                 "reference: run `pipeline targets calibrate` first")
    probe, reference_ms = SpeedProbe(threads, tmp), predictor.reference_ms
    variants = []
    t0 = time.perf_counter()
    previous = json.loads(Path(args.out).read_text()) if args.int8_only else None
    built = []  # (model, ratio, quantization, path, predicted ms)
    for name, make in ({} if args.int8_only else ZOO).items():
        for ratio in (0.0, 0.5):
            torch.manual_seed(0)
            model = make().eval()
            if ratio:
                [m] = build_recipe([CompressStep(method="structured", ratio=ratio, finetune_epochs=0)])
                run_recipe(model, [m], CompressContext(data, TrainConfig()))
            fp32 = export_model("onnx", model, data.input_shape, tmp / f"{name}-{ratio}.onnx", 17)
            int8, _ = quantize_model("int8-static", fp32, tmp / f"{name}-{ratio}-int8.onnx", calib, data.x_test[:10],
                                     data.y_test[:10], 1.0)
            for quant, path in (("fp32", fp32), ("int8", int8)):
                built.append((name, ratio, quant, path, predict_model(path, host)["latency_ms"]))
    # every variant measured in each of --repeats passes over the whole list, so one variant's measurements are
    # minutes apart; the median of them is its figure (one pass is at the mercy of a noisy minute on a shared VM)
    passes: list[list[tuple[float, float, float]]] = [[] for _ in built]
    for _ in range(args.repeats):
        for i, (_, _, _, path, _) in enumerate(built):
            before = probe.probe()
            raw = steady_latency_ms(path, data.input_shape, threads)
            speed = reference_ms / ((before + probe.probe()) / 2)
            passes[i].append((raw * speed, raw, speed))  # at the machine speed of calibration time
    for (name, ratio, quant, _, predicted), runs in zip(built, passes):
        measured, raw, speed = sorted(runs)[len(runs) // 2]
        err = (predicted - measured) / measured
        variants.append({"model": name, "structured_ratio": ratio, "quantization": quant,
                         "predicted_ms": round(predicted, 4), "measured_ms": round(measured, 4),
                         "measured_passes_ms": [round(r[0], 4) for r in runs],
                         "measured_raw_ms": round(raw, 4), "speed_factor": round(speed, 4),
                         "error_pct": round(100 * err, 2)})
        print(f"{name:18s} ratio {ratio:.1f} {quant}: predicted {predicted:8.4f} ms, measured "
              f"{measured:8.4f} ms (median of {len(runs)}), error {100 * err:+6.1f}%", flush=True)
    if previous is not None:
        variants = previous["variants"]
    errors = np.array([abs(v["error_pct"]) for v in variants])

    # int8 vs fp32 on a model big enough to be compute-bound, trained
    torch.manual_seed(0)
    resnet = zoo.resnet_small((1, 28, 28), 10)
    train(resnet, data, 3, 2e-3)
    fp32 = export_model("onnx", resnet, data.input_shape, tmp / "resnet-trained.onnx", 17)
    int8, q = quantize_model("int8-static", fp32, tmp / "resnet-trained-int8.onnx", data.x_train[:256],
                             data.x_test, data.y_test, 1.0)
    _, cmp = compare_latency([fp32, int8], data.input_shape, threads=threads, rounds=7, runs=50)
    int8_report = {"model": "resnet-small (32/64/128, trained 3 epochs)",
                   "size_ratio": round(q["size_fp32_bytes"] / q["size_quantized_bytes"], 3),
                   "speedup": cmp["speedup"], "speedup_spread": cmp["speedup_spread"],
                   "accuracy_fp32": q["accuracy_fp32"], "accuracy_int8": q["accuracy_quantized"],
                   "accuracy_drop_pt": round(100 * (q["accuracy_fp32"] - q["accuracy_quantized"]), 2),
                   "sqnr_db": q["sqnr_db"], "threads": threads}
    result = {
        "host": host.description, "threads": threads, "variants": variants,
        "share_within_10pct": round(float((errors <= 10).mean()), 3),
        "share_within_20pct": round(float((errors <= 20).mean()), 3),
        "median_abs_error_pct": round(float(np.median(errors)), 2),
        "int8": int8_report, "wall_s": round(time.perf_counter() - t0),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwithin 10%: {result['share_within_10pct']:.0%}, within 20%: {result['share_within_20pct']:.0%}, "
          f"median |error| {result['median_abs_error_pct']}% over {len(variants)} variants")
    print(f"int8 vs fp32 ({int8_report['model']}): size {int8_report['size_ratio']}x, speedup "
          f"{int8_report['speedup']}x {int8_report['speedup_spread']}, accuracy {int8_report['accuracy_fp32']:.2%} -> "
          f"{int8_report['accuracy_int8']:.2%} ({int8_report['accuracy_drop_pt']:+.2f} pt), SQNR {int8_report['sqnr_db']} dB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
