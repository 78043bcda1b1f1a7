"""``pipeline broker config``: a Mosquitto configuration for the fleet (TLS, client certificates, ACL)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PipelineError
from . import output


def cmd_broker(args: argparse.Namespace, ui) -> int:
    from ..broker.config import write_broker_config
    from ..ui.tables import print_broker_config

    devices = list(args.device or [])
    prefix = "edgefleet"
    if Path(args.config).is_file():
        from ..config import load_deploy

        cfg = load_deploy(args.config)
        devices = devices or cfg.fleet.device_ids()
        prefix = cfg.fleet.topic_prefix
    try:
        made = write_broker_config(Path(args.out), devices, args.port, prefix, args.host or None)
    except ValueError as exc:
        raise PipelineError(f"broker config: {exc}") from None
    print_broker_config(ui, made, devices, args.port)
    output.emit(args, {"config": str(made["config"]), "acl": str(made["acl"]), "ca": str(made["ca"]),
                       "host": {"cert": str(made["host"].cert), "key": str(made["host"].key)},
                       "devices": {d: {"cert": str(i.cert), "key": str(i.key)} for d, i in made["devices"].items()}})
    return output.OK


def add_broker(sub) -> None:
    b = sub.add_parser("broker", help="write a Mosquitto configuration for a fleet: TLS, client certificates, ACL")
    b.add_argument("action", choices=["config"])
    b.add_argument("--out", required=True, help="directory for mosquitto.conf, acl and certificates")
    b.add_argument("--port", type=int, default=8883)
    b.add_argument("--device", action="append", help="a device id (repeatable; default: fleet.devices)")
    b.add_argument("--host", action="append", help="a name or address the broker is reached at (repeatable)")
    b.add_argument("--config", default="deploy.yaml")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_broker)


COMMANDS = {"broker": add_broker}
