"""``pipeline profile`` and ``targets``: a model file against a device class, the classes, and calibrating this
machine as one."""

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


def cmd_targets(args: argparse.Namespace, ui) -> int:
    from ..targets import known_targets, load_target

    if args.action == "calibrate":
        return cmd_calibrate(args, ui)
    profiles = [load_target(n) for n in known_targets()]
    if not output.emit(args, [p.model_dump() for p in profiles]):
        from ..ui.tables import print_targets

        print_targets(ui, profiles)
    return output.OK


def cmd_calibrate(args: argparse.Namespace, ui) -> int:
    from ..profile.calibrate import calibrate, write_host_yaml
    from ..targets import targets_dir
    from ..ui.tables import print_calibration

    out = Path(args.out) if args.out else targets_dir() / "host.yaml"
    with ui.stage("Calibrate this machine as a target"):
        result = calibrate(args.threads, args.models, progress=ui.info, kernel_scale=args.kernel_scale)
        write_host_yaml(result, out)
    print_calibration(ui, result, out)
    output.emit(args, {k: v for k, v in result.items() if k != "host"})
    return output.OK


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="profile a model file against a target's budgets")
    p.add_argument("model", help="an .onnx or .tflite file")
    p.add_argument("--target", required=True)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)


def add_targets(sub) -> None:
    t = sub.add_parser("targets", help="list the known device classes, or calibrate this machine as one")
    t.add_argument("action", nargs="?", choices=["list", "calibrate"], default="list")
    t.add_argument("--json", action="store_true")
    t.add_argument("--out", help="calibrate: where to write (default: targets/host.yaml)")
    t.add_argument("--threads", type=int, default=None, help="calibrate: threads (default: all cores)")
    t.add_argument("--models", type=int, default=32, help="calibrate: random models to fit on")
    t.add_argument("--kernel-scale", type=int, default=4,
                   help="calibrate: x ~310 single kernels timed for the kernel-level predictor (0: skip)")
    t.set_defaults(func=cmd_targets)


COMMANDS = {"profile": add_profile, "targets": add_targets}
