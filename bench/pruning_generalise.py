"""Does unstructured pruning generalise? Every family at 90% sparsity on digits, on architectures written
for this benchmark (never tuned on) and on the zoo's, against the dense model after the same fine-tuning.

    .venv/bin/python bench/pruning_generalise.py [--quick] [--json] [--models a,b] [--families x,y]
                                                 [--out bench/results/pruning_generalise.json]

The two fresh architectures hold what broke global magnitude and sensitivity pruning before: BatchNorm
everywhere, a two-branch concatenation, inverted residuals with depthwise convolutions and residual adds,
a stride-2 stage, a hidden linear layer. A third, fresh-shufflese (grouped convolutions with a channel
shuffle, squeeze-and-excitation gates, projected shortcuts), was written after the budget below was fixed and
is the held-out check of it. Every family runs with its defaults at ``--sparsity`` and one
budget shared by every model (nothing is chosen per model): ``--finetune`` epochs (as many as the dense
run by default) at the training learning rate, distilling from the dense model: fine-tuning after
one-shot pruning, split over 10 steps (iterative magnitude) or 5 (sensitivity); sparse training runs
from scratch for as many epochs as dense training and fine-tuning together (the same training compute);
the lottery ticket trains as long as the dense run per round over 3 rounds (its row reads the round that
reaches the target sparsity, not the sparsest winning ticket it keeps).

The ``dense-ft`` column is a second reference: the dense model fine-tuned for the same epochs, unpruned
(the difference to it is what pruning costs over training on as long).

Per row: accuracy after fine-tuning, dense accuracy, their difference in points, the sparsity reached over
the prunable weights, the sparsest layer, classifier rows left without a weight, classes the pruned model
predicts on the test set, and the family's wall time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds profile.py, which would shadow the standard library's `profile`: put the repo first instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.compress import CompressContext, build_recipe, run_recipe  # noqa: E402
from pipeline.compress.base import prunable, thinness  # noqa: E402
from pipeline.config import CompressStep, FinetuneConfig, TrainConfig  # noqa: E402
from pipeline.data import Dataset, load_dataset  # noqa: E402
from pipeline.models.registry import MODELS  # noqa: E402
from pipeline.models import zoo  # noqa: E402, F401  (registers the zoo)
from pipeline.models.training import predict_logits, train  # noqa: E402


# --------------------------------------------------------------------------- fresh architectures

def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1,
            act: bool = True) -> nn.Sequential:
    pad = dilation * (k // 2)
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class InvRes(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (BN after each); a residual add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, 1, act=False))
        self.add = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.add else self.body(x)


class ForkNet(nn.Module):
    """A stem, two branches concatenated (3x3 | 1x1 then depthwise 3x3), inverted residuals, a 1x1 head."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.left = conv_bn(16, 12)
        self.right = nn.Sequential(conv_bn(16, 8, 1), conv_bn(8, 8, 3, groups=8))
        self.blocks = nn.Sequential(InvRes(20, 20), InvRes(20, 32, stride=2), InvRes(32, 32))
        self.head = conv_bn(32, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.fc(self.head(self.blocks(x)).mean((2, 3)))


class MultiScale(nn.Module):
    """Two depthwise-separable branches at dilation 1 and 2, concatenated, added back onto the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.near = nn.Sequential(conv_bn(c, c, 3, groups=c), conv_bn(c, half, 1, act=False))
        self.far = nn.Sequential(conv_bn(c, c, 3, groups=c, dilation=2), conv_bn(c, c - half, 1, act=False))

    def forward(self, x):
        return torch.relu(x + torch.cat([self.near(x), self.far(x)], 1))


class DualPath(nn.Module):
    """A plain stem, a separable residual block, a stride-2 conv, a multi-scale concat block with its residual
    add, then a two-layer classifier on a pooled 2x2 map."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 24)
        self.sep = nn.Sequential(conv_bn(24, 24, 3, groups=24), conv_bn(24, 24, 1, act=False))
        self.down = conv_bn(24, 48, 3, stride=2)
        self.mix = MultiScale(48)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(48 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.sep(x))
        return self.classifier(self.pool(self.mix(self.down(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1),
                                nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(x)


class ShuffleBlock(nn.Module):
    """Grouped 1x1 (4 groups), a channel shuffle, depthwise 3x3, grouped 1x1, squeeze-excite; a projected
    shortcut (1x1, stride) when the shape changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.reduce = nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                                    nn.Hardswish())
        self.dw = conv_bn(cout, cout, 3, stride, groups=cout, act=False)
        self.expand = nn.Sequential(nn.Conv2d(cout, cout, 1, groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout
                      else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        y = self.reduce(x)
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.nn.functional.hardswish(self.short(x) + self.se(self.expand(self.dw(y))))


class ShuffleSE(nn.Module):
    """Written after the budget was fixed and never tuned on: a 5x5 stem, grouped convolutions with a channel
    shuffle, squeeze-and-excitation gates (a multiply), projected shortcuts, a max-pool, Hardswish, dropout."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16, k=5)
        self.blocks = nn.Sequential(ShuffleBlock(16, 32), ShuffleBlock(32, 32), nn.MaxPool2d(2),
                                    ShuffleBlock(32, 48, stride=2), ShuffleBlock(48, 48))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(48, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


FRESH: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "fresh-forknet": lambda shape, n: ForkNet(shape[0], n),
    "fresh-dualpath": lambda shape, n: DualPath(shape[0], n),
    "fresh-shufflese": lambda shape, n: ShuffleSE(shape[0], n),
}
#: the zoo's small models (its real-scale ones are for bench/realscale.py); one that refuses 8x8 is skipped
ZOO = ("small-cnn", "lenet5", "resnet-small", "mobilenetv2-small")


# --------------------------------------------------------------------------- families

def families(sparsity: float, dense_epochs: int, finetune: int, lr: float, lottery_epochs: int) -> dict[str, list]:
    """One recipe per family: the family's defaults, the target sparsity and the shared budget: ``finetune``
    epochs at the training ``lr`` after the dense model, sparse training as many as dense and fine-tuning
    together, the lottery ``lottery_epochs`` per round."""
    rounds = 3
    iterative, gradual = 10, 5
    return {
        "dense-ft": [{"method": "dense-finetune", "finetune_epochs": finetune}],
        "magnitude": [{"method": "magnitude", "sparsity": sparsity, "finetune_epochs": finetune, "lr": lr}],
        "magnitude-iter": [{"method": "magnitude", "sparsity": sparsity, "steps": iterative,
                            "finetune_epochs": max(1, finetune // iterative), "lr": lr}],
        "lottery": [{"method": "lottery", "rounds": rounds, "epochs": lottery_epochs, "rewind_steps": 20, "lr": lr,
                     "prune_per_round": round(1 - (1 - sparsity) ** (1 / rounds), 6)}],
        "rigl": [{"method": "sparse-training", "algorithm": "rigl", "sparsity": sparsity,
                  "epochs": dense_epochs + finetune, "lr": lr}],
        "set": [{"method": "sparse-training", "algorithm": "set", "sparsity": sparsity,
                 "epochs": dense_epochs + finetune, "lr": lr}],
        "sens-taylor": [{"method": "sensitivity", "sparsity": sparsity, "criterion": "taylor", "steps": gradual,
                         "finetune_epochs": max(1, finetune // gradual), "lr": lr}],
        "sens-hessian": [{"method": "sensitivity", "sparsity": sparsity, "criterion": "hessian", "steps": gradual,
                          "finetune_epochs": max(1, finetune // gradual), "lr": lr}],
    }


def classifier(model: nn.Module, num_classes: int) -> nn.Module | None:
    heads = [m for _, m in prunable(model) if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return heads[-1] if heads else None


def measure(model: nn.Module, data: Dataset) -> dict[str, Any]:
    layers = prunable(model)
    total = sum(m.weight.numel() for _, m in layers)
    nonzero = sum(int(m.weight.count_nonzero()) for _, m in layers)
    worst = max(layers, key=lambda nm: 1 - int(nm[1].weight.count_nonzero()) / nm[1].weight.numel())
    head = classifier(model, data.num_classes)
    empty_rows = int((head.weight.detach().abs().sum(1) == 0).sum()) if head is not None else None
    predicted = predict_logits(model, data.x_test).argmax(1).numpy()
    return {"accuracy": round(float((predicted == data.y_test).mean()), 4), "sparsity": round(1 - nonzero / total, 4),
            "max_layer": worst[0], "max_layer_sparsity": round(1 - int(worst[1].weight.count_nonzero())
                                                              / worst[1].weight.numel(), 4),
            "empty_classifier_rows": empty_rows, "classes_predicted": int(len(np.unique(predicted))),
            "weights_per_channel": thinness(model)["weights_per_channel"]}


def run_family(dense: nn.Module, data: Dataset, recipe: list[dict], lr: float, distill: bool,
               schedule: str) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    ctx = CompressContext(data, TrainConfig(lr=lr), FinetuneConfig(distill=distill, schedule=schedule),
                          progress=lambda m: None)
    t0 = time.perf_counter()
    if recipe[0]["method"] == "dense-finetune":  # the reference: the dense model trained on as long, no pruning
        ctx.finetune_model(model, recipe[0]["finetune_epochs"], lr)
        return {**measure(model, data), "wall_s": round(time.perf_counter() - t0, 2)}
    [report] = run_recipe(model, build_recipe([CompressStep(**s) for s in recipe]), ctx)
    wall = time.perf_counter() - t0
    out = measure(model, data)
    if recipe[0]["method"] == "lottery":  # the round at the target, not the ticket the step keeps
        last = report.history[-1]
        out.update(accuracy=round(last["accuracy"], 4), sparsity=last["sparsity"],
                   lottery_dense_accuracy=round(report.extra["dense_accuracy"], 4), lottery_kept=report.extra["kept"])
        out.pop("max_layer"), out.pop("max_layer_sparsity"), out.pop("empty_classifier_rows")
        out.pop("classes_predicted")
    out["wall_s"] = round(wall, 2)
    return out


# --------------------------------------------------------------------------- output

def table(rows: list[dict], names: list[str], cell: Callable[[dict], str]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["family"]): r for r in rows}
    header = ["model", *names]
    body = [[m, *(cell(by[m, f]) if (m, f) in by else "-" for f in names)] for m in models]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def combine(runs: list[dict]) -> list[dict]:
    """One row per model and family over the seeds: mean accuracy, difference and wall time, the worst layer
    and row counts; a family that failed on any seed is an error row."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["family"]), []).append(r)
    out = []
    for (model, family), rs in groups.items():
        failed = [r for r in rs if "error" in r]
        if failed:
            out.append({"model": model, "family": family, "error": failed[0]["error"], "wall_s": 0.0})
            continue
        row = {"model": model, "family": family, "accuracy": round(float(np.mean([r["accuracy"] for r in rs])), 4),
               "accuracies": [r["accuracy"] for r in rs],
               "sparsity": round(float(np.mean([r["sparsity"] for r in rs])), 4),
               "wall_s": round(float(np.mean([r["wall_s"] for r in rs])), 2)}
        if "delta" in rs[0]:
            row["delta"] = round(float(np.mean([r["delta"] for r in rs])), 4)
        for key, pick in (("max_layer_sparsity", max), ("empty_classifier_rows", max), ("classes_predicted", min),
                          ("weights_per_channel", min)):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = pick(values)
        out.append(row)
    return out


def accuracy_cell(r: dict) -> str:
    if r["family"] == "dense":
        return f"{r['accuracy']:.3f}"
    flags = ""
    if r.get("empty_classifier_rows"):
        flags += f" !{r['empty_classifier_rows']}rows"
    return f"{r['accuracy']:.3f} ({100 * r['delta']:+.1f}){flags}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run with tiny budgets (numbers meaningless)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join([*FRESH, *ZOO]))
    ap.add_argument("--families", default=None, help="comma-separated subset of the families")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    ap.add_argument("--finetune", type=int, default=30, help="epochs each family trains after the dense model "
                    "(fine-tuning over all its steps; sparse training's whole run)")
    ap.add_argument("--no-distill", action="store_true", help="fine-tune without the dense model as teacher")
    ap.add_argument("--lottery-epochs", type=int, default=None, help="training epochs of the lottery's dense run "
                    "and of each round (default: --epochs, Frankle & Carbin's protocol)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default=FinetuneConfig().schedule,
                    help="learning rate over each fine-tuning run (default: fine-tuning's own default)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: each one a data split, a dense model and "
                    "every family again; tables show the means (one test split holds 360 images: 1 pt is 3.6)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.finetune, args.lottery_epochs = 2, 2, 1
    torch.set_num_threads(args.threads)
    seeds = [int(x) for x in args.seeds.split(",")]
    args.lottery_epochs = args.lottery_epochs or args.epochs
    recipes = families(args.sparsity, args.epochs, args.finetune, args.lr, args.lottery_epochs)
    chosen = args.families.split(",") if args.families else list(recipes)
    unknown = sorted(set(chosen) - set(recipes))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(recipes)}")
    builders = {**FRESH, **{name: MODELS.get(name) for name in ZOO}}
    models = args.models.split(",") if args.models else list(builders)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    t_start = time.perf_counter()
    for name, seed in ((n, s) for n in models for s in seeds):
        data = load_dataset("digits", seed=seed)
        torch.manual_seed(seed)
        try:
            dense = builders[name](data.input_shape, data.num_classes)
        except ValueError as exc:
            skipped[name] = str(exc)
            print(f"skip {name}: {exc}", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        train(dense, data, args.epochs, args.lr, seed=seed)
        d = {"model": name, "family": "dense", "seed": seed, **measure(dense, data),
             "wall_s": round(time.perf_counter() - t0, 2), "params": sum(m.weight.numel() for _, m in prunable(dense))}
        rows.append(d)
        print(f"{name} (seed {seed}): dense {d['accuracy']:.4f}, {d['params']:,} prunable weights", file=sys.stderr,
              flush=True)
        for fam in chosen:
            try:
                r = run_family(dense, data, recipes[fam], args.lr, not args.no_distill, args.schedule)
            except Exception as exc:  # noqa: BLE001 - a family that fails is a row, not the end of the run
                r = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "accuracy": float("nan"), "wall_s": 0.0}
            r = {"model": name, "family": fam, "seed": seed, **r, "delta": round(r["accuracy"] - d["accuracy"], 4)}
            rows.append(r)
            print(f"  {fam:14s} {r['accuracy']:.4f} ({100 * r['delta']:+.1f} pt) sparsity {r.get('sparsity', '-')} "
                  f"max layer {r.get('max_layer_sparsity', '-')} empty rows {r.get('empty_classifier_rows', '-')} "
                  f"{r['wall_s']:.1f} s {r.get('error', '')}", file=sys.stderr, flush=True)
    data = load_dataset("digits", seed=seeds[0])
    result = {"dataset": f"digits ({len(data.x_train)} train / {len(data.x_test)} test)", "quick": args.quick,
              "seeds": seeds,
              "sparsity": args.sparsity, "budget": {"dense_epochs": args.epochs, "finetune_epochs": args.finetune,
                                                    "lottery_epochs_per_round": args.lottery_epochs, "lr": args.lr,
                                                    "distill": not args.no_distill, "schedule": args.schedule},
              "recipes": {f: recipes[f] for f in chosen}, "threads": args.threads, "skipped": skipped,
              "wall_s": round(time.perf_counter() - t_start, 1), "rows": combine(rows), "runs": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    names = ["dense", *chosen]
    print(f"accuracy on digits at {args.sparsity:.0%} sparsity after fine-tuning (difference to dense in points;"
          f" !Nrows: classifier rows left empty; mean over seeds {seeds})")
    rows = result["rows"]
    print(table(rows, names, lambda r: "error" if "error" in r else accuracy_cell(r)))
    print("\nsparsity reached / sparsest layer / weights left per output channel")
    print(table(rows, chosen and names[1:], lambda r: "error" if "error" in r else
                f"{r['sparsity']:.3f}/{r.get('max_layer_sparsity', '-')}/{r.get('weights_per_channel', '-')}"))
    print("\nwall time, s (dense: training)")
    print(table(rows, names, lambda r: f"{r['wall_s']:.1f}"))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"\ntotal {result['wall_s']} s")


if __name__ == "__main__":
    main()
