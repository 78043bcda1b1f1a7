"""``pipeline config schema``: deploy.yaml's JSON Schema, for editors and CI."""

from __future__ import annotations

import argparse

from . import output


def cmd_config(args: argparse.Namespace, ui) -> int:
    from ..config import json_schema

    output.dump(json_schema(), indent=None if args.json else 2)
    return output.OK


def add_config(sub) -> None:
    cf = sub.add_parser("config", help="deploy.yaml itself: print its JSON Schema (for editors and CI)")
    cf.add_argument("action", choices=["schema"])
    cf.add_argument("--json", action="store_true", help="one line instead of indented")
    cf.set_defaults(func=cmd_config)


COMMANDS = {"config": add_config}
