"""``pipeline``: the host command. It only parses arguments and wires stages together."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BudgetError, PipelineError

EXIT_DELIVERY = 4


def _write_report(path: str | None, report: dict[str, Any]) -> None:
    if path:
        from device_agent.storage import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps(report, indent=2, default=str).encode())


def cmd_deploy(args: argparse.Namespace, ui) -> int:
    from .config import load_deploy
    from .deploy import delivery_ok, run_deploy

    cfg = load_deploy(args.config)
    names = [t.strip() for t in args.target.split(",") if t.strip()]
    reports = []
    for name in names:  # one artifact per device class
        try:
            reports.append(run_deploy(cfg, name, ui, force=args.force, cache=not args.no_cache))
        except BudgetError as exc:
            if exc.report is not None:
                exc.report["error"] = str(exc)
                reports.append(exc.report)
                _write_report(args.report, reports[0] if len(names) == 1 else {"deployments": reports})
            raise
    report = reports[0] if len(names) == 1 else {"targets": names, "deployments": reports}
    _write_report(args.report, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    ok = all(delivery_ok(r) for r in reports)
    ui.console.print("[bold green]deployed[/]" if ok else "[bold red]delivery incomplete: see the table above[/]")
    return 0 if ok else EXIT_DELIVERY


def cmd_compress(args: argparse.Namespace, ui) -> int:
    from .compress.stage import compress, write_outputs
    from .config import load_deploy

    cfg = load_deploy(args.config)
    with ui.stage(f"Compress {cfg.name} (recipe: {args.recipe or 'default'})"):
        result = compress(cfg, ui, args.recipe)
    with ui.stage(f"Write {args.out}"):
        report = write_outputs(result, cfg, Path(args.out), ui, threads=args.threads)
    _print_layers(ui, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def _print_layers(ui, report: dict[str, Any]) -> None:
    rows = [[l["layer"], l["type"], "x".join(map(str, l["shape"])), f"{l['sparsity']:.1%}",
             f"{l['channels_nonzero']}/{l['channels']}"] for l in report["layers"]]
    ui.table("Layers after compression", ["layer", "type", "shape", "sparsity", "channels kept"], rows)
    o = report["onnx"]
    ui.table("Summary", ["", "dense", "compressed", "ratio"], [
        ["parameters", f"{report['params_before']:,}", f"{report['params']:,}",
         f"{report['params_before'] / report['params']:.2f}x"],
        ["nonzero parameters", f"{report['params_before']:,}", f"{report['nonzero_params']:,}",
         f"{1 / report['kept_fraction']:.2f}x"],
        ["MACs", f"{report['macs_before']:,}", f"{report['macs']:,}", f"{report['mac_ratio']:.2f}x"],
        ["ONNX bytes", f"{o['size']['dense']['bytes']:,}", f"{o['size']['compressed']['bytes']:,}",
         f"{o['size_ratio']:.2f}x"],
        ["ONNX gzip bytes", f"{o['size']['dense']['gzip_bytes']:,}", f"{o['size']['compressed']['gzip_bytes']:,}",
         f"{o['gzip_size_ratio']:.2f}x"],
        [f"latency ms ({o['threads']} thread)", o["latency_ms"]["dense"], o["latency_ms"]["compressed"],
         f"{o['speedup']:.2f}x"],
        ["test accuracy", f"{report['accuracy_before']:.2%}", f"{report['accuracy_after']:.2%}",
         f"{(report['accuracy_after'] - report['accuracy_before']) * 100:+.2f} pt"],
    ])


def cmd_rollback(args: argparse.Namespace, ui) -> int:
    from .config import load_deploy
    from .ota.rollback import run_rollback

    cfg = load_deploy(args.config)
    report = run_rollback(cfg, args.target, ui, args.to)
    _write_report(args.report, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    ok = all(d["status"] in ("rolled_back", "activated") for d in report["delivery"])
    return 0 if ok else EXIT_DELIVERY


def cmd_history(args: argparse.Namespace, ui) -> int:
    from .config import load_deploy
    from .fleet import FleetStore

    cfg = load_deploy(args.config)
    store = FleetStore(cfg.resolve(cfg.workdir) / "fleet.db")
    try:
        rows = store.history(args.target, args.limit)
        for r in rows:
            r["devices"] = store.results(r["id"])
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        import datetime as dt

        ui.table("Deployments", ["when", "target", "kind", "version", "status", "devices", "reason"],
                 [[dt.datetime.fromtimestamp(r["ts"]).strftime("%Y-%m-%d %H:%M:%S"), r["target"], r["kind"],
                   r["version"], r["status"], ", ".join(f"{d['device_id']}={d['status']}" for d in r["devices"]),
                   (r["reason"] or "")[:50]] for r in rows])
    return 0


def cmd_fit(args: argparse.Namespace, ui) -> int:
    from .config import load_deploy
    from .fit import print_fit, run_fit
    from .targets import target_for_deploy

    cfg = load_deploy(args.config)
    target = target_for_deploy(cfg, args.target)
    with ui.stage(f"Fit {cfg.name} to {target.name}"):
        fitted = run_fit(cfg, target, ui, Path(args.out) if args.out else None)
    print_fit(ui, fitted, target)
    if args.json:
        print(json.dumps(fitted.to_dict(), indent=2, default=str))
    if fitted.best is None:
        ui.console.print(f"[bold red]no candidate meets every budget of {target.name}[/]")
        return BudgetError.exit_code
    return 0


def cmd_profile(args: argparse.Namespace, ui) -> int:
    from .deploy import _print_profile
    from .profile import profile_model
    from .targets import load_target

    target = load_target(args.target)
    path = Path(args.model)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file")
    prof = profile_model(path, target, runs=args.runs)
    _print_profile(ui, prof, target)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2))
    return BudgetError.exit_code if prof.failures else 0


def cmd_targets(args: argparse.Namespace, ui) -> int:
    from .targets import known_targets, load_target

    if args.action == "calibrate":
        return cmd_calibrate(args, ui)
    profiles = [load_target(n) for n in known_targets()]
    if args.json:
        print(json.dumps([p.model_dump() for p in profiles], indent=2))
    else:
        ui.table("Targets", ["name", "description", "cores", "GFLOP/s fp32", "RAM MB", "runtimes"],
                 [[p.name, p.description, p.cpu.cores, p.cpu.peak_gflops_fp32, p.memory.ram_mb, ", ".join(p.runtimes)]
                  for p in profiles])
    return 0


def cmd_calibrate(args: argparse.Namespace, ui) -> int:
    from .profile.calibrate import calibrate, write_host_yaml
    from .targets import targets_dir

    out = Path(args.out) if args.out else targets_dir() / "host.yaml"
    with ui.stage("Calibrate this machine as a target"):
        result = calibrate(args.threads, args.models, progress=ui.info, kernel_scale=args.kernel_scale)
        write_host_yaml(result, out)
    ui.table("Op factors (latency = overhead + factor x roofline time)", ["category", "overhead us", "factor"],
             [[c, f["overhead_us"], f["roofline_factor"]] for c, f in result["ops"].items()])
    ui.info(f"fit on {result['fit']['models']} models: median error {result['fit']['median_abs_error_pct']}%, "
            f"{result['fit']['within_10pct']:.0%} within 10%; wrote {out}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "host"}, indent=2))
    return 0


def cmd_broker(args: argparse.Namespace, ui) -> int:
    from .broker.config import write_broker_config

    devices = list(args.device or [])
    prefix = "edgefleet"
    if Path(args.config).is_file():
        from .config import load_deploy

        cfg = load_deploy(args.config)
        devices = devices or cfg.fleet.device_ids()
        prefix = cfg.fleet.topic_prefix
    try:
        made = write_broker_config(Path(args.out), devices, args.port, prefix, args.host or None)
    except ValueError as exc:
        raise PipelineError(f"broker config: {exc}") from None
    ui.info(f"wrote {made['config']} (TLS on port {args.port}, client certificates required) and {made['acl']}")
    ui.info(f"CA {made['ca']}; host identity {made['host'].cert}; {len(devices)} device identit"
            f"{'y' if len(devices) == 1 else 'ies'}: {', '.join(devices) or '(none: pass --device ID)'}")
    ui.info(f"run it: mosquitto -c {made['config']}")
    if args.json:
        print(json.dumps({"config": str(made["config"]), "acl": str(made["acl"]), "ca": str(made["ca"]),
                          "host": {"cert": str(made["host"].cert), "key": str(made["host"].key)},
                          "devices": {d: {"cert": str(i.cert), "key": str(i.key)} for d, i in made["devices"].items()}},
                         indent=2))
    return 0


def cmd_config(args: argparse.Namespace, ui) -> int:
    from .config import json_schema

    print(json.dumps(json_schema(), indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Compress, profile and ship models to device fleets.")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("deploy", help="compress, export, profile, sign and deliver a model to one device class")
    d.add_argument("--target", required=True, help="device class(es): a file in targets/ (e.g. rpi4, or rpi4,rpi5)")
    d.add_argument("--config", default="deploy.yaml", help="deployment file (default: deploy.yaml)")
    d.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    d.add_argument("--force", action="store_true", help="deploy even when a budget fails")
    d.add_argument("--no-cache", action="store_true",
                   help="compress again even when WORKDIR/cache/compress holds this exact result")
    d.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    d.set_defaults(func=cmd_deploy)

    c = sub.add_parser("compress", help="run a compression recipe; write checkpoint, ONNX and a report")
    c.add_argument("--config", default="deploy.yaml")
    c.add_argument("--recipe", default=None, help="a name under 'recipes:' in the config (default: 'compress:')")
    c.add_argument("--out", required=True, help="output directory (replaced atomically)")
    c.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency comparison")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compress)

    from .fleet_cli import add_parsers
    from .provision.cli import add_parsers as add_provision_parsers

    add_parsers(sub)
    add_provision_parsers(sub)

    rb = sub.add_parser("rollback", help="bring a device class back to its previous model (or to --to VERSION)")
    rb.add_argument("--target", required=True)
    rb.add_argument("--to", type=int, default=None, help="an earlier version: signed again as a new one")
    rb.add_argument("--config", default="deploy.yaml")
    rb.add_argument("--report", metavar="FILE.json")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=cmd_rollback)

    h = sub.add_parser("history", help="deployments and rollbacks recorded in the fleet store")
    h.add_argument("--target", default=None)
    h.add_argument("--limit", type=int, default=20)
    h.add_argument("--config", default="deploy.yaml")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=cmd_history)

    f = sub.add_parser("fit", help="search compression x quantization for the most accurate model within budgets")
    f.add_argument("--target", required=True)
    f.add_argument("--config", default="deploy.yaml")
    f.add_argument("--out", help="directory for candidates and pareto.png (default: WORKDIR/fit/TARGET)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fit)

    p = sub.add_parser("profile", help="profile a model file against a target's budgets")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--target", required=True)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    b = sub.add_parser("broker", help="write a Mosquitto configuration for a fleet: TLS, client certificates, ACL")
    b.add_argument("action", choices=["config"])
    b.add_argument("--out", required=True, help="directory for mosquitto.conf, acl and certificates")
    b.add_argument("--port", type=int, default=8883)
    b.add_argument("--device", action="append", help="a device id (repeatable; default: fleet.devices)")
    b.add_argument("--host", action="append", help="a name or address the broker is reached at (repeatable)")
    b.add_argument("--config", default="deploy.yaml")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_broker)

    cf = sub.add_parser("config", help="deploy.yaml itself: print its JSON Schema (for editors and CI)")
    cf.add_argument("action", choices=["schema"])
    cf.add_argument("--json", action="store_true", help="one line instead of indented")
    cf.set_defaults(func=cmd_config)

    t = sub.add_parser("targets", help="list the known device classes, or calibrate this machine as one")
    t.add_argument("action", nargs="?", choices=["list", "calibrate"], default="list")
    t.add_argument("--json", action="store_true")
    t.add_argument("--out", help="calibrate: where to write (default: targets/host.yaml)")
    t.add_argument("--threads", type=int, default=None, help="calibrate: threads (default: all cores)")
    t.add_argument("--models", type=int, default=32, help="calibrate: random models to fit on")
    t.add_argument("--kernel-scale", type=int, default=4,
                   help="calibrate: x ~310 single kernels timed for the kernel-level predictor (0: skip)")
    t.set_defaults(func=cmd_targets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .ui import UI

    ui = UI()
    try:
        return args.func(args, ui)
    except PipelineError as exc:
        if args.debug:
            raise
        ui.console.print(f"[bold red]error:[/] {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        ui.console.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
