"""``pipeline deploy``, ``rollback`` and ``history``: models onto a device class, back off it, and the record."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BudgetError
from ..export.formats import all_quantizations
from . import output


def cmd_deploy(args: argparse.Namespace, ui) -> int:
    from ..config import load_deploy
    from ..deploy import delivery_ok, run_deploy

    cfg = load_deploy(args.config)
    if args.quantize:
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"quantize": args.quantize})})
    model_file = Path(args.model).resolve() if args.model else None
    names = [t.strip() for t in args.target.split(",") if t.strip()]
    reports = []
    for name in names:  # one artifact per device class
        try:
            reports.append(run_deploy(cfg, name, ui, force=args.force, cache=not args.no_cache,
                                      model_file=model_file))
        except BudgetError as exc:
            if exc.report is not None:
                exc.report["error"] = str(exc)
                reports.append(exc.report)
                output.write_report(args, reports[0] if len(names) == 1 else {"deployments": reports})
            raise
    report = reports[0] if len(names) == 1 else {"targets": names, "deployments": reports}
    output.write_report(args, report)
    output.emit(args, report)
    ok = all(delivery_ok(r) for r in reports)
    ui.console.print("[bold green]deployed[/]" if ok else "[bold red]delivery incomplete: see the table above[/]")
    return output.OK if ok else output.DELIVERY_INCOMPLETE


def cmd_rollback(args: argparse.Namespace, ui) -> int:
    from ..config import load_deploy
    from ..ota.rollback import run_rollback

    cfg = load_deploy(args.config)
    report = run_rollback(cfg, args.target, ui, args.to)
    output.write_report(args, report)
    output.emit(args, report)
    ok = all(d["status"] in ("rolled_back", "activated") for d in report["delivery"])
    return output.OK if ok else output.DELIVERY_INCOMPLETE


def cmd_history(args: argparse.Namespace, ui) -> int:
    from ..config import load_deploy
    from ..fleet import FleetStore

    cfg = load_deploy(args.config)
    store = FleetStore(cfg.fleet.store_at(cfg.resolve(cfg.workdir)))
    try:
        rows = store.history(args.target, args.limit)
        for r in rows:
            r["devices"] = store.results(r["id"])
    finally:
        store.close()
    if not output.emit(args, rows):
        from ..ui.tables import print_history

        print_history(ui, rows)
    return output.OK


def add_deploy(sub) -> None:
    d = sub.add_parser("deploy", help="compress, export, profile, sign and deliver a model to one device class")
    d.add_argument("--target", required=True, help="device class(es): a file in targets/ (e.g. rpi4, or rpi4,rpi5)")
    d.add_argument("--config", default="deploy.yaml", help="deployment file (default: deploy.yaml)")
    d.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    d.add_argument("--force", action="store_true", help="deploy even when a budget fails")
    d.add_argument("--no-cache", action="store_true",
                   help="compress again even when WORKDIR/cache/compress holds this exact result")
    d.add_argument("--model", metavar="FILE", help="ship this .onnx or .tflite file instead of deploy.yaml's model "
                   "(no compression, no PyTorch; checked against deploy.yaml's data)")
    d.add_argument("--quantize", choices=all_quantizations(), help="instead of deploy.yaml's export.quantize")
    d.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    d.set_defaults(func=cmd_deploy)


def add_rollback(sub) -> None:
    rb = sub.add_parser("rollback", help="bring a device class back to its previous model (or to --to VERSION)")
    rb.add_argument("--target", required=True)
    rb.add_argument("--to", type=int, default=None, help="an earlier version: signed again as a new one")
    rb.add_argument("--config", default="deploy.yaml")
    rb.add_argument("--report", metavar="FILE.json")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=cmd_rollback)


def add_history(sub) -> None:
    h = sub.add_parser("history", help="deployments and rollbacks recorded in the fleet store")
    h.add_argument("--target", default=None)
    h.add_argument("--limit", type=int, default=20)
    h.add_argument("--config", default="deploy.yaml")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=cmd_history)


COMMANDS = {"deploy": add_deploy, "rollback": add_rollback, "history": add_history}
