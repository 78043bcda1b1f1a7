"""``pipeline compress`` and ``fit``: one recipe applied, or the search for the best model within budgets."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import output


def cmd_compress(args: argparse.Namespace, ui) -> int:
    from ..compress.stage import compress, write_outputs
    from ..config import load_deploy
    from ..ui.tables import print_layers

    cfg = load_deploy(args.config)
    with ui.stage(f"Compress {cfg.name} (recipe: {args.recipe or 'default'})"):
        result = compress(cfg.view_compress(), ui, args.recipe)
    with ui.stage(f"Write {args.out}"):
        report = write_outputs(result, cfg.name, cfg.export.opset, Path(args.out), ui,
                               threads=args.threads)
    print_layers(ui, report)
    output.emit(args, report)
    return output.OK


def cmd_fit(args: argparse.Namespace, ui) -> int:
    from ..config import load_deploy
    from ..fit import run_fit
    from ..ui.tables import print_fit
    from ..targets import target_for_deploy

    cfg = load_deploy(args.config)
    target = target_for_deploy(cfg, args.target)
    with ui.stage(f"Fit {cfg.name} to {target.name}"):
        fitted = run_fit(cfg, target, ui, Path(args.out) if args.out else None)
    print_fit(ui, fitted, target)
    output.emit(args, fitted.to_dict())
    if fitted.best is None:
        ui.console.print(f"[bold red]no candidate meets every budget of {target.name}[/]")
        return output.OVER_BUDGET
    return output.OK


def add_compress(sub) -> None:
    c = sub.add_parser("compress", help="run a compression recipe; write checkpoint, ONNX and a report")
    c.add_argument("--config", default="deploy.yaml")
    c.add_argument("--recipe", default=None, help="a name under 'recipes:' in the config (default: 'compress:')")
    c.add_argument("--out", required=True, help="output directory (replaced atomically)")
    c.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency comparison")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compress)


def add_fit(sub) -> None:
    f = sub.add_parser("fit", help="search compression x quantization for the most accurate model within budgets")
    f.add_argument("--target", required=True)
    f.add_argument("--config", default="deploy.yaml")
    f.add_argument("--out", help="directory for candidates and pareto.png (default: WORKDIR/fit/TARGET)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fit)


COMMANDS = {"compress": add_compress, "fit": add_fit}
