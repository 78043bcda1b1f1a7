"""``pipeline profile``: a model file against a device class (its budgets, and where the prediction comes from)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import output


def cmd_profile(args: argparse.Namespace, ui) -> int:
    from ..ui.tables import print_profile
    from ..export.model_file import inspect_model_file
    from ..profile import profile_model
    from ..targets import load_target

    target = load_target(args.target)
    path = Path(args.model)
    inspect_model_file(path)  # not a model, truncated, unloadable: one error naming the file
    prof = profile_model(path, target, runs=args.runs)
    print_profile(ui, prof, target)
    output.emit(args, prof.to_dict())
    return output.OVER_BUDGET if prof.failures else output.OK


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="profile a model file against a target's budgets")
    p.add_argument("model", help="an .onnx or .tflite file")
    p.add_argument("--target", required=True)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)


COMMANDS = {"profile": add_profile}
