"""Delta updates: the bytes of each patch against the full artifact, for four kinds of model update (issue 17).

    .venv/bin/python bench/delta.py [--quick] [--out bench/results/delta.json]

Models: MobileNetV2-224 with its 1000-class ImageNet head (``pipeline.models.MODELS["mobilenetv2"]``) and the
demo's small-cnn (1x28x28, 10 classes), each fp32 (``pipeline.export.export_model``) and int8 (the project's
``int8-static`` quantizer, pipeline.export.quantize, then ``minify`` as the export stage does). ``--quick``: the small
model only.

The base is the model after a few SGD steps in train mode from its seed (so its BatchNorm parameters differ from each
other, as a pretrained net's do: an untrained net's identical BN tensors are shared by the exporter). From it:

- (a) head-only: the classifier layer fine-tuned, a few SGD steps, the body frozen (BatchNorm in eval mode);
- (b) full fine-tune: every weight, a few SGD steps in train mode (BatchNorm statistics move too);
- (c) a further pruning step: the base pruned to 50% (global magnitude over conv and linear weights) against the same
  pruned to 60%, no fine-tune after it;
- (d) re-quantization: the base's int8 with new calibration data (int8 only).

The int8 rows of (a)-(c) quantize both sides with the same calibration data. Columns: full (the full artifact's
payload: the model, deflated when that saves 10%), tensors / binary (each patch, the smaller of its zlib and xz
encodings), chosen (pipeline.bundle.delta.choose: the smallest patch when it saves 1%, else full), full / chosen,
the device-side apply time (device_agent.delta.apply_delta on this host, median of 3: the base's hash, the rebuild
into a file, the result's hash) and the host's build time for both candidates.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from device_agent.delta import Delta, apply_delta  # noqa: E402
from pipeline.bundle import encode_payload  # noqa: E402
from pipeline.bundle.delta import build_patches, choose  # noqa: E402
from pipeline.export import export_model  # noqa: E402
from pipeline.export.onnx_files import minify  # noqa: E402
from pipeline.export.quantize import QUANTIZERS  # noqa: E402
from pipeline.models import MODELS  # noqa: E402

SCENARIOS = {"a": "head-only fine-tune", "b": "full fine-tune", "c": "pruning step 50->60%", "d": "re-quantization"}


def sgd(model: nn.Module, shape, classes: int, steps: int, params=None, train: bool = True, lr: float = 1e-3,
        seed: int = 1) -> nn.Module:
    """``steps`` SGD steps (momentum 0.9) on random data, on ``params`` (default: all); BN in train mode if ``train``."""
    model = copy.deepcopy(model)
    model.train(train)
    torch.manual_seed(seed)
    chosen = list(params(model)) if params is not None else list(model.parameters())
    opt = torch.optim.SGD(chosen, lr=lr, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(8, *shape), torch.randint(0, classes, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def pruned(model: nn.Module, sparsity: float) -> nn.Module:
    """Global magnitude pruning of every conv and linear weight to ``sparsity``."""
    model = copy.deepcopy(model)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = flat.kthvalue(max(1, int(sparsity * flat.numel()))).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).float())
    return model


def classifier(model: nn.Module):
    """The parameters of the model's last linear layer."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].parameters()


def int8(src: Path, dst: Path, shape, seed: int, samples: int) -> Path:
    calibration = np.random.default_rng(seed).random((samples, *shape), dtype=np.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    QUANTIZERS.get("int8-static")(src, dst, calibration)
    return minify(dst)


def apply_ms(base: bytes, new: bytes, patch: bytes, tmp: Path) -> float:
    (tmp / "base").write_bytes(base)
    (tmp / "patch").write_bytes(patch)
    delta, digest = Delta(1, hashlib.sha256(base).hexdigest()), hashlib.sha256(new).hexdigest()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        apply_delta(tmp / "patch", tmp / "base", tmp / "out", delta, len(new), digest)
        times.append((time.perf_counter() - t0) * 1000)
    if (tmp / "out").read_bytes() != new:
        raise SystemExit("the rebuilt model differs from the new one")
    return statistics.median(times)


def measure(model: str, precision: str, scenario: str, base: Path, new: Path, tmp: Path) -> dict:
    old_b, new_b = base.read_bytes(), new.read_bytes()
    full = len(encode_payload(new_b)[0])
    t0 = time.perf_counter()
    patches = build_patches(old_b, new_b)
    build_s = time.perf_counter() - t0
    sizes = {k: len(p) if p is not None else None for k, p in patches.items()}
    chosen = choose(full, sizes)
    chosen_bytes = full if chosen == "full" else sizes[chosen]
    row = {"model": model, "precision": precision, "scenario": scenario, "update": SCENARIOS[scenario],
           "model_bytes": len(new_b), "full_bytes": full, "tensors_bytes": sizes["tensors"],
           "binary_bytes": sizes["binary"], "chosen": chosen, "chosen_bytes": chosen_bytes,
           "ratio": round(full / chosen_bytes, 2),
           "apply_ms": None if chosen == "full" else round(apply_ms(old_b, new_b, patches[chosen], tmp), 1),
           "build_s": round(build_s, 1)}
    print(f"  {model} {precision} ({scenario}): full {full}, tensors {sizes['tensors']}, binary {sizes['binary']} "
          f"-> {chosen} x{row['ratio']}", flush=True)
    return row


def variants(name: str, make, shape, classes: int, tmp: Path, calib: int) -> dict[str, Path]:
    """The base and each update as ONNX files, fp32 and int8."""
    torch.manual_seed(0)
    base = sgd(make(), shape, classes, steps=2, seed=0)  # distinct BN parameters, as a pretrained net has
    models = {"base": base, "a": sgd(base, shape, classes, 3, params=classifier, train=False),
              "b": sgd(base, shape, classes, 3), "c0": pruned(base, 0.5), "c": pruned(base, 0.6)}
    files = {}
    for key, m in models.items():
        files[f"fp32-{key}"] = export_model("onnx", m, shape, tmp / name / key / "model.onnx", 17)
        files[f"int8-{key}"] = int8(files[f"fp32-{key}"], tmp / name / key / "model.int8.onnx", shape, 0, calib)
    files["int8-d"] = int8(files["fp32-base"], tmp / name / "d" / "model.int8.onnx", shape, 1, calib)
    return files


def table(rows: list[dict]) -> str:
    head = ["model", "prec", "update", "model B", "full B", "tensors B", "binary B", "chosen", "full/chosen",
            "apply ms", "build s"]
    body = [[r["model"], r["precision"], f"({r['scenario']}) {r['update']}", r["model_bytes"], r["full_bytes"],
             r["tensors_bytes"] if r["tensors_bytes"] is not None else "-", r["binary_bytes"], r["chosen"],
             f"{r['ratio']:.1f}x", r["apply_ms"] if r["apply_ms"] is not None else "-", r["build_s"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small model only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "delta.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    nets = [("small-cnn", lambda: MODELS.get("small-cnn")((1, 28, 28), 10), (1, 28, 28), 10, 64)]
    if not args.quick:
        nets.append(("mobilenetv2-224", lambda: MODELS.get("mobilenetv2")((3, 224, 224), 1000), (3, 224, 224), 1000,
                     32))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        tmp = Path(tmp)
        for name, make, shape, classes, calib in nets:
            print(f"{name}: building the base and its updates", flush=True)
            files = variants(name, make, shape, classes, tmp, calib)
            for precision in ("fp32", "int8"):
                for scenario in ("a", "b", "c", "d"):
                    if scenario == "d" and precision == "fp32":
                        continue
                    base = files[f"{precision}-{'c0' if scenario == 'c' else 'base'}"]
                    rows.append(measure(name, precision, scenario, base, files[f"{precision}-{scenario}"], tmp))
    print()
    print(table(rows))
    a_rows = [r for r in rows if r["scenario"] == "a"]
    checks = {"head_only_at_least_10x": {f"{r['model']} {r['precision']}": r["ratio"] >= 10 for r in a_rows},
              "never_above_full_plus_1pct": all(r["chosen_bytes"] <= 1.01 * r["full_bytes"] for r in rows)}
    print()
    print(f"goal (a) >= 10x smaller: {checks['head_only_at_least_10x']}; never above full + 1%: "
          f"{checks['never_above_full_plus_1pct']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "delta patch bytes vs the full artifact per kind of update (bench/delta.py)",
        "host": {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
                 "cpus": __import__("os").cpu_count()},
        "rows": rows, "checks": checks}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
