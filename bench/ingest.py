"""Telemetry ingest rate against the broker's own delivery rate, in one run.

    .venv/bin/python bench/ingest.py [--devices 200] [--messages 20000]

Simulated devices publish QoS 1 metrics through Mosquitto on loopback. broker_rate: messages per
second a plain subscriber receives (no storage); ingest_rate: messages per second committed to SQLite
by the ingester (batched, acknowledged after commit). Each phase is timed from the first publish to
the last message received / stored.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from device_agent.mqtt import MqttLink  # noqa: E402
from device_agent.protocol import Metrics, encode  # noqa: E402
from pipeline.fleet import FleetStore  # noqa: E402
from pipeline.fleet.ingest import Ingester  # noqa: E402
from pipeline.broker import LocalBroker  # noqa: E402


def publish(broker, devices: int, messages: int, ts0: float) -> None:
    links = [MqttLink(broker, f"sim-pub-{i}", lambda t, p: None).start() for i in range(4)]
    infos = []
    for i in range(messages):
        device = f"dev-{i % devices:04d}"
        m = Metrics(device, 1, 1.0, 2.0, 80.0, 10, True, ts=ts0 + i)
        infos.append(links[i % 4].publish(f"edgefleet/v1/{device}/metrics", encode(m), qos=1))
    for info in infos:
        info.wait_for_publish(30)
    for link in links:
        link.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    n = args.messages
    with LocalBroker("mosquitto", tmp / "broker") as broker:
        got, done = [0], threading.Event()

        def on_message(t, p):
            got[0] += 1
            if got[0] >= n:
                done.set()

        sub = MqttLink(broker.config, "plain-subscriber", on_message, [("edgefleet/v1/+/metrics", 1)]).start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        publish(broker.config, args.devices, n, 1_000_000.0)
        done.wait(120)
        broker_s = time.perf_counter() - t0
        sub.stop()
        print(f"broker: {got[0]} messages in {broker_s:.2f} s")

        db = tmp / "fleet.db"
        ingester = Ingester(broker.config, db)
        worker = threading.Thread(target=ingester.run, daemon=True)
        worker.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        publish(broker.config, args.devices, n, 2_000_000.0)
        deadline = time.monotonic() + 300
        while ingester.stored < n and time.monotonic() < deadline:
            time.sleep(0.01)
        ingest_s = time.perf_counter() - t0
        ingester.stop()
        worker.join(10)
    store = FleetStore(db)
    stored = store.count("metrics")
    store.close()
    result = {"devices": args.devices, "sent": n, "stored": stored, "broker_received": got[0],
              "broker_rate": round(got[0] / broker_s), "ingest_rate": round(stored / ingest_s),
              "ingest_share_of_broker": round((stored / ingest_s) / (got[0] / broker_s), 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:24s} {v}")


if __name__ == "__main__":
    main()
