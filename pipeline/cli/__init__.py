"""``pipeline``: the host command. It parses arguments, calls the stages, renders (``pipeline.ui.tables``) and
maps outcomes to exit codes (``output``); one module per command group, each registering its own subcommands
and importing its stages inside the command, so ``--help`` and the fleet commands stay torch-free."""

from __future__ import annotations

import argparse
import logging

from .. import __version__
from . import broker, compress, config, deploy, fleet, profile, provision, quantize, targets

#: each group's ``COMMANDS``: subcommand name -> the function that adds its parser
GROUPS = (deploy, compress, quantize, fleet, provision, profile, targets, broker, config)
#: the order ``pipeline --help`` lists the subcommands in
ORDER = ("deploy", "compress", "quantize", "fleet", "dashboard", "provision", "devices", "rollback", "history", "fit", "profile",
         "broker", "config", "targets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Compress, profile and ship models to device fleets.")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = {name: add for group in GROUPS for name, add in group.COMMANDS.items()}
    assert sorted(adders) == sorted(ORDER), "every command registered once and listed in ORDER"
    for name in ORDER:
        adders[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..ui import UI
    from .output import run

    return run(args.func, args, UI())

