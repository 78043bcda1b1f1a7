"""``pipeline targets [list]`` and ``pipeline targets calibrate --target T``: the device classes, and calibrating
one from its own devices (``host`` through a local agent process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from . import output


def cmd_targets(args: argparse.Namespace, ui) -> int:
    from ..targets import known_targets, load_target

    if args.action == "calibrate":
        return cmd_calibrate(args, ui)
    profiles = [load_target(n) for n in known_targets()]
    if not output.emit(args, [p.model_dump() for p in profiles]):
        from ..ui.tables import print_targets

        print_targets(ui, profiles)
    return output.OK


def _context(args: argparse.Namespace, offline: bool = False):
    """(fleet config, the user's broker or None, workdir, key dir, the target). Without a deploy.yaml (none named,
    none here) the defaults: a local broker and ``.edgefleet`` in this directory; enough to calibrate ``host``.
    ``offline``: nothing will be shipped, so the broker's files are neither checked nor loaded."""
    from ..broker import external_broker
    from ..config import FleetConfig, load_deploy
    from ..targets import load_target, target_for_deploy

    path = Path(args.config or "deploy.yaml")
    if args.config or path.is_file():
        from ..inputs import check_fleet_files

        cfg = load_deploy(path)
        if offline:
            return (cfg.fleet, None, cfg.resolve(cfg.workdir), cfg.resolve(cfg.signing.key_dir),
                    target_for_deploy(cfg, args.target))
        check_fleet_files(cfg)
        return (cfg.fleet, external_broker(cfg), cfg.resolve(cfg.workdir), cfg.resolve(cfg.signing.key_dir),
                target_for_deploy(cfg, args.target))
    workdir = Path(".edgefleet").resolve()
    return FleetConfig(), None, workdir, workdir / "keys", load_target(args.target)


def cmd_calibrate(args: argparse.Namespace, ui) -> int:
    from ..calibration import run_calibration
    from ..profile.calibrate import parse_scale
    from ..targets import known_targets
    from ..ui.tables import print_calibration

    if not args.target:
        raise ConfigError(f"targets calibrate: --target is required (known: {', '.join(known_targets())})")
    if args.from_fleet:
        return _from_fleet(args, ui)
    for flag, value in (("--devices", args.devices), ("--timeout", args.timeout), ("--budget", args.budget)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag}: expected a positive number, got {value:g}")
    if args.budget is not None and args.budget > 86_400:
        raise ConfigError(f"--budget: at most 86400 s (a day), got {args.budget:g}")
    scale = parse_scale(args.scale or "full")
    fleet, broker, workdir, key_dir, target = _context(args)
    report = run_calibration(fleet, broker, target, workdir, key_dir, ui, device_ids=args.device,
                             count=args.devices, timeout_s=args.timeout, scale=scale, budget_s=args.budget)
    if not output.emit(args, report):
        print_calibration(ui, report)
    return output.DELIVERY_INCOMPLETE if report["unfinished"] else output.OK


def _from_fleet(args: argparse.Namespace, ui) -> int:
    """``--from-fleet``: nothing is shipped, so the flags that shape a suite's run are refused, not ignored."""
    from ..calibration import refit_from_fleet
    from ..ui.tables import print_refit

    given = [flag for flag, value in (("--devices", args.devices), ("--device", args.device),
                                      ("--timeout", args.timeout), ("--scale", args.scale),
                                      ("--budget", args.budget)) if value is not None]
    if given:
        raise ConfigError(f"targets calibrate --from-fleet ships no suite, so {', '.join(given)} "
                          f"{'does' if len(given) == 1 else 'do'} not apply: it refits from the latest stored suite "
                          "results and the fleet store (drop them, or run without --from-fleet to time a new suite)")
    fleet, _, workdir, _, target = _context(args, offline=True)
    report = refit_from_fleet(target, workdir, ui, store=fleet.store_at(workdir))
    if not output.emit(args, report):
        print_refit(ui, report)
    return output.OK


def add_targets(sub) -> None:
    t = sub.add_parser("targets", help="list the known device classes, or calibrate one from its devices",
                       description="`pipeline targets calibrate --target T`: build a calibration suite, ship it as a "
                       "signed calibration artifact to T's devices (for host: a local agent process), collect what "
                       "they time, and fit T's predictor into the user targets directory with its provenance. "
                       "--from-fleet refits it from the stored suite results plus the fleet's measured models.")
    t.add_argument("action", nargs="?", choices=["list", "calibrate"], default="list")
    t.add_argument("--json", action="store_true")
    t.add_argument("--target", help="calibrate: the device class")
    pick = t.add_mutually_exclusive_group()
    pick.add_argument("--devices", type=int, default=None, metavar="N",
                      help="calibrate: this many of the class's devices (default: all of them; host: one local agent)")
    pick.add_argument("--device", action="append", default=None, metavar="ID",
                      help="calibrate: this device (repeatable)")
    t.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="calibrate: stop waiting for devices after S seconds (default: the budget + fleet.timeout_s)")
    t.add_argument("--scale", default=None,
                   help="calibrate: suite size, tiny | small | full or a number (default full = 1; tiny takes seconds)")
    t.add_argument("--budget", type=float, default=None, metavar="S",
                   help="calibrate: the suite's time on a device at most (default 900 s)")
    t.add_argument("--from-fleet", action="store_true",
                   help="calibrate: ship nothing; refit from the latest stored suite results and the fleet's measured "
                   "latencies of the models deployed to the class (run a calibration and a deploy first)")
    t.add_argument("--config", default=None, help="calibrate: deploy.yaml (default: ./deploy.yaml if there is one)")
    t.set_defaults(func=cmd_targets)


COMMANDS = {"targets": add_targets}
