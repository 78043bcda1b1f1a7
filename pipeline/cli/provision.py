"""``pipeline provision`` and ``pipeline devices``: agents onto hosts over SSH, and the inventory beside what is
online."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ProvisionError
from . import output


def _split_host(text: str) -> tuple[str | None, str]:
    user, _, host = text.rpartition("@")
    return (user or None), host


def _plans(args: argparse.Namespace, cfg) -> list:
    from ..targets import target_for_deploy
    from ..provision.provisioner import HostPlan

    key = Path(args.key).expanduser() if args.key else None
    if args.host:
        if not args.target:
            raise ConfigError("provision --host needs --target (the device class, e.g. rpi4)")
        user, host = _split_host(args.host)
        device_id = args.id or re.sub(r"[^A-Za-z0-9_-]", "-", f"{args.target}-{host}")
        from device_agent.protocol import ProtocolError, check_id

        try:
            check_id(device_id, "--id")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        return [HostPlan(device_id, target_for_deploy(cfg, args.target), host, args.port or 22, user, key,
                         args.install_dir, args.python or "python3")]
    if not (args.all or args.device):
        raise ConfigError("provision: name the devices: --host [USER@]ADDRESS --target T, --device ID, or --all "
                          "(fleet.devices with a host in deploy.yaml)")
    specs = [cfg.fleet.device(d) for d in args.device] if args.device else \
        [d for d in cfg.fleet.devices if d.host]
    if not specs:
        raise ConfigError("provision --all: no entry of fleet.devices has a host (add host: USER@ADDRESS)")
    plans = []
    for d in specs:
        if not d.host:
            raise ConfigError(f"fleet.devices: {d.id} has no host to provision over SSH")
        target = d.target or args.target
        if not target:
            raise ConfigError(f"fleet.devices: {d.id} has no target (its device class); add target: or pass --target")
        user, host = _split_host(d.host)
        plans.append(HostPlan(d.id, target_for_deploy(cfg, target), host, args.port or d.port, d.user or user,
                              key or (cfg.resolve(d.key.expanduser()) if d.key else None), args.install_dir or d.install_dir,
                              args.python or d.python))
    return plans


def _fleet_side(args: argparse.Namespace, cfg):
    from ..bundle import load_or_create, public_key_path
    from ..broker import external_broker
    from ..provision.provisioner import FleetSide

    host_broker = external_broker(cfg)
    if args.broker:
        from device_agent.config import BrokerConfig

        host, _, port = args.broker.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--broker: expected HOST:PORT, got {args.broker!r}")
        host_broker = BrokerConfig(host, int(port))
    if host_broker is None:
        raise ConfigError("provisioning needs the broker devices will connect to: fleet.broker in deploy.yaml, or "
                          "--broker HOST:PORT")
    p = cfg.fleet.provision
    key_dir = cfg.resolve(cfg.signing.key_dir)
    load_or_create(key_dir)
    ca_file = cfg.fleet.broker.ca_file if cfg.fleet.broker and not args.broker else None
    return FleetSide(workdir=cfg.resolve(cfg.workdir), broker_host=p.broker_host or host_broker.host,
                     broker_port=host_broker.port, broker_protocol=host_broker.protocol, host_broker=host_broker,
                     prefix=cfg.fleet.topic_prefix, signing_pub=public_key_path(key_dir),
                     ca_dir=cfg.resolve(ca_file).parent if ca_file else None,
                     metrics_interval_s=p.metrics_interval_s,
                     online_timeout_s=args.timeout or p.online_timeout_s, min_free_mb=p.min_free_mb,
                     strict_host_keys=p.strict_host_keys)


def cmd_provision(args: argparse.Namespace, ui) -> int:
    from ..config import load_deploy
    from ..provision.provisioner import provision
    from ..ui.tables import ProvisionProgress, print_provisioned

    cfg = load_deploy(args.config)
    plans = _plans(args, cfg)
    fleet = _fleet_side(args, cfg)
    if fleet.broker_host in ("127.0.0.1", "localhost", "::1") and any(
            p.host not in ("127.0.0.1", "localhost", "::1") for p in plans):
        ui.warn(f"devices will connect to the broker at {fleet.broker_host}, their own loopback; set "
                "fleet.provision.broker_host to an address they can reach")
    t0 = time.monotonic()
    with ProvisionProgress(ui, plans) as progress:
        results = provision(plans, fleet, args.parallel or cfg.fleet.provision.parallel, progress)
    failed = [r for r in results if r.status == "failed"]
    output.emit(args, [r.to_dict() for r in results])
    print_provisioned(ui, results, time.monotonic() - t0)
    for r in failed:
        output.error(ui, r.error)
    return output.PROVISION_FAILED if failed else output.OK


def live_fleet(broker, prefix: str, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """The retained online flags and statuses the broker holds for every device: all of them, once the watch's
    marker has come back after them (``pipeline.ota.watch``), or what arrived within ``timeout_s``."""
    from device_agent.mqtt import ConnectError
    from device_agent.protocol import PROTOCOL_VERSION, Leaf, ProtocolError, decode, parse_topic

    from ..ota.watch import Watch

    seen: dict[str, dict[str, Any]] = {}

    def on_message(name: str, payload: bytes) -> None:
        if not name:
            return
        try:
            device, leaf = parse_topic(prefix, name)
            entry = seen.setdefault(device, {})
            if leaf is Leaf.ONLINE:
                entry["online"] = payload == b"online"
            else:
                entry["status"] = decode(payload, "status")  # shown as the device said it, whatever it holds
        except ProtocolError:
            pass

    base = f"{prefix}/v{PROTOCOL_VERSION}/+/"
    watch = Watch(broker, prefix, [(base + Leaf.ONLINE.value, 1), (base + Leaf.STATUS.value, 1)], on_message,
                  name="devices")
    try:
        watch.start()
    except ConnectError as exc:
        raise ProvisionError(f"cannot reach the broker for the live view: {exc} (--offline shows the store only)") \
            from None
    try:
        watch.settle(timeout_s)
    finally:
        watch.stop()
    return seen


def cmd_devices(args: argparse.Namespace, ui) -> int:
    from ..config import load_deploy
    from ..fleet import FleetStore
    from ..broker import external_broker

    cfg = load_deploy(args.config)
    store = FleetStore(cfg.fleet.store_at(cfg.resolve(cfg.workdir)))
    try:
        known = {d["device_id"]: d for d in store.devices()}
    finally:
        store.close()
    broker = external_broker(cfg)
    live = live_fleet(broker, cfg.fleet.topic_prefix) if broker is not None and not args.offline else {}
    rows = []
    for spec in cfg.fleet.devices:
        rows.append(_device_row(spec.id, spec, known.get(spec.id), live.get(spec.id)))
    for device_id in sorted((set(live) | set(known)) - {d.id for d in cfg.fleet.devices}):
        rows.append(_device_row(device_id, None, known.get(device_id), live.get(device_id)))
    if not output.emit(args, rows):
        from ..ui.tables import print_devices

        print_devices(ui, rows)
    return output.OK


def _device_row(device_id: str, spec, stored: dict | None, live: dict | None) -> dict[str, Any]:
    status = (live or {}).get("status") or {}
    stored = stored or {}
    online = (live or {}).get("online")
    if online is None and stored.get("online") is not None:
        online = bool(stored["online"])
    return {"device_id": device_id, "in_inventory": spec is not None,
            "target": (spec.target if spec else None) or status.get("target") or stored.get("target"),
            "host": spec.host if spec else None, "groups": spec.groups if spec else [],
            "online": online, "agent_version": status.get("agent_version") or stored.get("agent_version"),
            "active_version": status.get("active_version", stored.get("active_version")),
            "state": status.get("state") or stored.get("state"), "source": "broker" if live else
            ("store" if stored else None)}


def add_provision(sub) -> None:
    p = sub.add_parser("provision", help="install the agent on devices over SSH and wait until they report online")
    p.add_argument("--config", default="deploy.yaml")
    p.add_argument("--all", action="store_true", help="every fleet.devices entry with a host")
    p.add_argument("--device", action="append", default=[], help="a fleet.devices id (repeatable)")
    p.add_argument("--host", help="[USER@]ADDRESS of one device not in the inventory (with --target)")
    p.add_argument("--target", help="its device class (targets/*.yaml); default for inventory entries without one")
    p.add_argument("--id", help="with --host: the device id (default: TARGET-ADDRESS)")
    p.add_argument("--port", type=int, default=None, help="SSH port (default 22, or the inventory's)")
    p.add_argument("--key", help="SSH private key (default: your agent and ~/.ssh keys)")
    p.add_argument("--install-dir", default=None, help="on the device (default /opt/edgefleet as root, "
                                                       "else ~/.edgefleet-agent)")
    p.add_argument("--python", default=None, help="the device's Python (default python3)")
    p.add_argument("--broker", help="HOST:PORT of the broker devices use (default: fleet.broker)")
    p.add_argument("--parallel", type=int, default=None, help="hosts at once (default fleet.provision.parallel)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each agent to come online")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_provision)


def add_devices(sub) -> None:
    d = sub.add_parser("devices", help="the inventory next to what is online, with agent and model versions")
    d.add_argument("--config", default="deploy.yaml")
    d.add_argument("--offline", action="store_true", help="do not ask the broker; show the fleet store's view")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)


COMMANDS = {"provision": add_provision, "devices": add_devices}
