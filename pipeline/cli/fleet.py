"""``pipeline fleet {status,drift,ingest,retain}`` and ``pipeline dashboard``: the fleet as the store sees it."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from ..errors import PipelineError
from . import output


def _context(args: argparse.Namespace):
    """(deploy config or None, fleet store: a path or a postgresql:// URL). ``--db`` alone works without a
    deploy.yaml."""
    from ..config import load_deploy
    from ..fleet import location

    if args.db and not Path(args.config).is_file():
        return None, location(args.db)
    cfg = load_deploy(args.config)
    return cfg, location(args.db) if args.db else cfg.fleet.store_at(cfg.resolve(cfg.workdir))


def _broker(args: argparse.Namespace, cfg):
    from device_agent.config import BrokerConfig

    from ..broker import external_broker

    if args.broker:
        host, _, port = args.broker.rpartition(":")
        if not host or not port.isdigit():
            raise PipelineError(f"--broker: expected HOST:PORT, got {args.broker!r}")
        return BrokerConfig(host, int(port))
    return external_broker(cfg) if cfg is not None else None


def _retention(cfg):
    from ..config import RetentionConfig

    return (cfg.fleet.retention if cfg is not None else RetentionConfig()).policy()


def _thresholds(cfg):
    """What raises drift events: deploy.yaml's ``drift:``, or the defaults without a deploy.yaml."""
    from device_agent.drift import Thresholds

    return cfg.drift.thresholds() if cfg is not None else Thresholds()


def _prefix(args: argparse.Namespace, cfg) -> str:
    return args.prefix or (cfg.fleet.topic_prefix if cfg is not None else "edgefleet")


def cmd_fleet(args: argparse.Namespace, ui) -> int:
    cfg, db = _context(args)
    if args.action == "ingest":
        return _ingest(args, ui, cfg, db)
    if args.action == "retain":
        return _retain(args, ui, cfg, db)
    if args.action == "drift":
        return _drift(args, ui, db)
    from ..dashboard import BudgetBook, FleetView
    from ..fleet import FleetStore

    from ..fleet.accuracy import latest_calibrations

    store = FleetStore(db)
    try:
        view = FleetView(store, BudgetBook.from_config(cfg))
        devices, predictions, traffic = view.overview()["devices"], view.predictions(), view.traffic()
        calibrations, quality = latest_calibrations(store), view.quality()
    finally:
        store.close()
    if not output.emit(args, {"devices": devices, "predictions": predictions, "traffic": traffic,
                              "calibrations": calibrations, "quality": quality}):
        from ..ui.tables import print_calibrations, print_fleet, print_predictions, print_quality, print_traffic

        print_fleet(ui, devices)
        print_traffic(ui, traffic)
        print_quality(ui, quality)
        print_predictions(ui, predictions)
        print_calibrations(ui, calibrations)
    return output.OK


def _drift(args: argparse.Namespace, ui, db: Path | str) -> int:
    """``fleet drift``: per device and version the drift scores, their state, live accuracy and any shadow
    comparison (``pipeline.fleet.quality``), and the latest drift events."""
    from ..fleet import FleetStore
    from ..fleet.quality import drift_events, quality_summary

    store = FleetStore(db)
    try:
        if args.device is not None and store.db.execute("SELECT 1 FROM devices WHERE device_id = ?",
                                                        (args.device,)).fetchone() is None:
            known = [r[0] for r in store.db.execute("SELECT device_id FROM devices ORDER BY device_id LIMIT 20")]
            from ..fleet import redact

            raise PipelineError(f"fleet drift --device {args.device}: no such device in {redact(db)}; "
                                f"known: {', '.join(known) or '(none has reported)'}")
        quality = {**quality_summary(store, args.device), "events": drift_events(store, args.device)}
    finally:
        store.close()
    if not output.emit(args, quality):
        from ..ui.tables import print_drift

        print_drift(ui, quality)
    return output.OK


def _ingest(args: argparse.Namespace, ui, cfg, db: Path | str) -> int:
    from ..fleet import redact
    from ..fleet.ingest import Ingester

    broker = _broker(args, cfg)
    if broker is None:
        raise PipelineError("fleet ingest: no broker; pass --broker HOST:PORT or set fleet.broker in deploy.yaml")
    prefix = _prefix(args, cfg)
    ingester = Ingester(broker, db, prefix, args.group, shared=not args.no_shared, client_id=args.client_id,
                        retention=_retention(cfg), drift=_thresholds(cfg))
    signal.signal(signal.SIGTERM, lambda *_: ingester.stop())
    ui.info(f"ingesting {prefix}/v1/+/{{metrics,status,events,online}} from {broker.host}:{broker.port} into "
            f"{redact(db)} (Ctrl-C stops)")
    try:
        ingester.run()
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        from ..errors import DeliveryError

        raise DeliveryError(f"fleet ingest stopped: {exc}") from None
    skipped = sum(ingester.traffic_skipped.values())
    left_out = sum(ingester.quality_skipped.values())
    ui.info(f"stored {ingester.stored} row(s)"
            + (f"; left out {skipped} malformed traffic value(s)" if skipped else "")
            + (f"; left out {left_out} malformed drift, accuracy or shadow value(s)" if left_out else "")
            + (f"; recorded {ingester.drift_events} drift event(s)" if ingester.drift_events else ""))
    return output.OK


def _retain(args: argparse.Namespace, ui, cfg, db: Path | str) -> int:
    from ..fleet import FleetStore
    from ..fleet.retention import RetentionPolicy, apply_retention, parse_duration

    base = _retention(cfg)
    policy = RetentionPolicy(parse_duration(args.raw, "--raw") if args.raw else base.raw_s,
                             parse_duration(args.bucket, "--bucket") if args.bucket else base.bucket_s,
                             parse_duration(args.keep, "--keep") if args.keep else base.rollup_s)
    store = FleetStore(db)
    try:
        done = apply_retention(store, policy)
    finally:
        store.close()
    if not output.emit(args, done, indent=None):
        from ..ui.tables import print_retention

        print_retention(ui, done, policy)
    return output.OK


def cmd_dashboard(args: argparse.Namespace, ui) -> int:
    from ..dashboard import BudgetBook, Dashboard, new_token
    from ..dashboard.server import is_loopback
    from ..fleet import redact
    from ..fleet.ingest import Ingester

    cfg, db = _context(args)
    host = args.host or (cfg.fleet.dashboard.host if cfg is not None else "127.0.0.1")
    port = args.port if args.port is not None else (cfg.fleet.dashboard.port if cfg is not None else 8600)
    token = args.token or os.environ.get("EDGEFLEET_DASHBOARD_TOKEN")
    if not token and not is_loopback(host):
        token = new_token()  # beyond loopback, never without one
    broker = None if args.no_ingest else _broker(args, cfg)
    ingester = None
    if broker is not None:
        ingester = Ingester(broker, db, _prefix(args, cfg), args.group, client_id=f"dashboard-{args.group}",
                            retention=_retention(cfg), drift=_thresholds(cfg))
    dash = Dashboard(db, host, port, token, BudgetBook.from_config(cfg), ingester)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with dash:
        url = dash.url + (f"?token={token}" if token else "")
        output.emit(args, {"url": dash.url, "token": token, "db": redact(db),
                           "ingest": f"{broker.host}:{broker.port}" if broker else None}, indent=None, flush=True)
        ui.info(f"dashboard: {url}")
        ui.info(f"Prometheus: {dash.url}metrics" + (" (Authorization: Bearer <token>)" if token else ""))
        ui.info(f"ingesting from {broker.host}:{broker.port}" if broker else
                "not ingesting (no broker: --broker HOST:PORT or fleet.broker); showing the store as it is")
        warned = False
        try:
            while not stop.wait(0.5):
                if ingester is not None and ingester.error and not warned:
                    ui.warn(f"the ingester stopped ({ingester.error}); the dashboard shows the store as it is "
                            "(/healthz answers 503)")
                    warned = True
        except KeyboardInterrupt:
            pass
    return output.OK


def add_fleet(sub) -> None:
    fl = sub.add_parser("fleet", help="ingest fleet telemetry into the store, show the fleet and its models' drift, "
                                      "apply retention")
    fl.add_argument("action", choices=["status", "drift", "ingest", "retain"])
    fl.add_argument("--config", default="deploy.yaml")
    fl.add_argument("--db", help="fleet store: a SQLite file or a postgresql:// URL (default: fleet.store, "
                                 "else WORKDIR/fleet.db)")
    fl.add_argument("--broker", help="ingest: HOST:PORT (default: fleet.broker)")
    fl.add_argument("--prefix", default=None, help="topic prefix (default: fleet.topic_prefix)")
    fl.add_argument("--group", default="ingest", help="ingest: shared-subscription group")
    fl.add_argument("--client-id", default=None,
                    help="ingest: MQTT client id, stable across restarts (default: ingest-GROUP); "
                         "give each ingester of a group its own")
    fl.add_argument("--no-shared", action="store_true", help="ingest: plain subscriptions (brokers without $share)")
    fl.add_argument("--raw", help="retain: keep raw metrics this long (default: fleet.retention.raw, 7d)")
    fl.add_argument("--bucket", help="retain: then one row per device and bucket (default 5m)")
    fl.add_argument("--keep", help="retain: drop rollups and events older than this (default 90d)")
    fl.add_argument("--device", default=None, help="drift: only this device")
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_fleet)


def add_dashboard(sub) -> None:
    d = sub.add_parser("dashboard", help="serve the live fleet dashboard and /metrics, ingesting telemetry beside it")
    d.add_argument("--config", default="deploy.yaml")
    d.add_argument("--db", help="fleet store: a SQLite file or a postgresql:// URL (default: fleet.store, "
                                "else WORKDIR/fleet.db)")
    d.add_argument("--host", default=None, help="bind address (default: fleet.dashboard.host, 127.0.0.1)")
    d.add_argument("--port", type=int, default=None, help="port (default: fleet.dashboard.port, 8600; 0: any free)")
    d.add_argument("--token", default=None, help="required from clients (default: EDGEFLEET_DASHBOARD_TOKEN; "
                                                 "made up and printed when binding beyond loopback)")
    d.add_argument("--broker", help="ingest from HOST:PORT (default: fleet.broker)")
    d.add_argument("--no-ingest", action="store_true", help="only show the store; another process ingests")
    d.add_argument("--prefix", default=None)
    d.add_argument("--group", default="ingest", help="shared-subscription group, shared with `fleet ingest`")
    d.add_argument("--json", action="store_true", help="print the URL and token as one JSON line on start")
    d.set_defaults(func=cmd_dashboard)


COMMANDS = {"fleet": add_fleet, "dashboard": add_dashboard}
