"""``device-agent``: the command a device runs (usually from its systemd unit)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from . import __version__
from .config import load_config
from .errors import AgentError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect to the broker and serve updates until stopped")
    run.add_argument("--config", required=True, help="agent.yaml")
    run.add_argument("--log-level", default="INFO")
    show = sub.add_parser("status", help="print the active model and the last update, from local state")
    show.add_argument("--config", required=True)
    bench = sub.add_parser("bench", help="time a model file on this device and print JSON")
    bench.add_argument("model")
    bench.add_argument("--runtime", default=None, help="default: by the file's suffix (.onnx, .tflite)")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--runs", type=int, default=100)
    bench.add_argument("--sysfs", default="/sys", help="where to look for energy counters (RAPL, hwmon)")
    unit = sub.add_parser("unit", help="print the systemd unit file for this agent")
    unit.add_argument("--config", default="/etc/edgefleet/agent.yaml")
    unit.add_argument("--exec", default=None, help="device-agent executable (default: this one)")
    args = parser.parse_args(argv)
    if args.command == "unit":
        return _unit(args)
    if args.command == "bench":
        return _bench(args)

    logging.basicConfig(level=args.log_level if args.command == "run" else "WARNING",
                        format="%(asctime)s %(levelname)s device-agent: %(message)s")
    try:
        config = load_config(args.config)
        if args.command == "status":  # read-only: never an Agent, which would count a start
            from .slots import SlotStore
            from .storage import read_json

            active = SlotStore(config.state_dir).active() if config.state_dir.exists() else None
            print(json.dumps({"device_id": config.device_id, "target": config.target,
                              "active": None if active is None else {"slot": active.slot, "version": active.version,
                                                                     "sha256": active.sha256},
                              "state": read_json(config.state_dir / "state.json", {})}, indent=1))
            return 0
        from .agent import Agent

        agent = Agent(config)
        signal.signal(signal.SIGTERM, lambda *_: agent.stop())
        signal.signal(signal.SIGINT, lambda *_: agent.stop())
        agent.run()
        return 0
    except AgentError as exc:
        print(f"device-agent: error: {exc}", file=sys.stderr)
        return 2


def _unit(args: argparse.Namespace) -> int:
    """The shipped unit, with this installation's executable and the given config filled in."""
    from pathlib import Path

    text = (Path(__file__).parent / "systemd" / "edgefleet-agent.service").read_text()
    exe = args.exec or str(Path(sys.executable).parent / "device-agent")
    text = text.replace("/opt/edgefleet/venv/bin/device-agent", exe).replace("/etc/edgefleet/agent.yaml", args.config)
    print(text, end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Latency percentiles and resident memory of one model on random inputs, as the agent runs it."""
    from pathlib import Path

    import numpy as np

    from .health import benchmark
    from .power import EnergyMeter
    from .runtimes import get_runtime, runtime_for

    try:
        session = get_runtime(args.runtime or runtime_for(Path(args.model))).load(Path(args.model), args.threads)
        rng = np.random.default_rng(0)
        feeds = {i.name: rng.random([d if isinstance(d, int) and d > 0 else 1 for d in i.shape]).astype(i.dtype)
                 for i in session.inputs}
        result = benchmark(session, feeds, runs=args.runs)
        meter = EnergyMeter.probe(Path(args.sysfs))
        energy = None
        if meter is not None:
            repeats = max(args.runs, int(0.5 / max(result.latency_ms_p50 / 1e3, 1e-6)))  # >= ~0.5 s of work
            energy = {"mj_per_inference": round(meter.measure(lambda: session.run(feeds), repeats), 5),
                      "source": meter.source, "repeats": repeats}
    except (AgentError, ValueError) as exc:
        print(f"device-agent: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"latency_ms_p50": result.latency_ms_p50, "latency_ms_p95": result.latency_ms_p95,
                      "rss_mb": result.rss_mb, "runs": result.runs, "threads": args.threads, "energy": energy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
