"""Local device agents standing in for a device class: one ``device-agent run`` process each.

Their figures are measured on this host and every report labels them as emulated.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import yaml

from device_agent.config import BrokerConfig
from device_agent.mqtt import MqttLink
from device_agent.protocol import Leaf, parse_topic, topic

from ..errors import DeliveryError

log = logging.getLogger(__name__)


class LocalFleet:
    def __init__(self, workdir: Path, broker: BrokerConfig, target: str, count: int, trusted_key: Path,
                 prefix: str, threads: int | None = None, metrics_interval_s: float = 0.0) -> None:
        self.workdir, self.broker, self.target = workdir, broker, target
        self.metrics_interval_s = metrics_interval_s
        self.trusted_key, self.prefix, self.threads = trusted_key, prefix, threads
        self.device_ids = [f"{target}-emu-{i}" for i in range(count)]
        self.procs: dict[str, subprocess.Popen] = {}

    def config_path(self, device_id: str) -> Path:
        return self.workdir / device_id / "agent.yaml"

    def socket_path(self, device_id: str) -> Path:
        """Where the agent serves its inference API: beside its state, unless that path is longer than a Unix
        socket's name may be (107 bytes); then a short one in a private directory under the temp dir."""
        path = (self.workdir / device_id / "state" / "infer.sock").resolve()
        if len(str(path).encode()) <= 100:
            return path
        private = Path(tempfile.gettempdir()) / f"edgefleet-{os.getuid()}"
        private.mkdir(mode=0o700, exist_ok=True)
        return private / f"{device_id[:40]}-{zlib.crc32(str(self.workdir.resolve()).encode()):08x}.sock"

    def write_config(self, device_id: str) -> Path:
        path = self.config_path(device_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "device_id": device_id, "target": self.target, "state_dir": "state",
            "trusted_keys": [str(self.trusted_key)], "topic_prefix": self.prefix,
            "broker": {"host": self.broker.host, "port": self.broker.port, "protocol": self.broker.protocol},
            "threads": self.threads, "emulated": True, "benchmark_runs": 100,
            "metrics_interval_s": self.metrics_interval_s, "serve": {"socket": str(self.socket_path(device_id))},
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout: float = 30.0) -> "LocalFleet":
        online: set[str] = set()
        seen = threading.Event()

        def on_message(name: str, payload: bytes) -> None:
            device_id, _ = parse_topic(self.prefix, name)
            if payload == b"online" and device_id in self.device_ids:
                online.add(device_id)
                if online >= set(self.device_ids):
                    seen.set()

        watcher = MqttLink(self.broker, f"host-watch-{os.getpid()}", on_message,
                           [(topic(self.prefix, d, Leaf.ONLINE), 1) for d in self.device_ids]).start()
        try:
            for device_id in self.device_ids:
                self.write_config(device_id)
                self.spawn(device_id)
            deadline = time.monotonic() + timeout
            while not seen.wait(0.2):
                dead = [d for d, p in self.procs.items() if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    tails = {d: self.log_tail(d) for d in (dead or self.device_ids)}
                    raise DeliveryError("local agents did not come online: " +
                                        "; ".join(f"{d}: {t}" for d, t in tails.items()))
        except BaseException:
            self.stop()
            raise
        finally:
            watcher.stop()
        return self

    def spawn(self, device_id: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start (or restart, after a crash) one agent process on its existing config and state."""
        cfg = self.config_path(device_id)
        with open(cfg.parent / "agent.log", "ab") as log:
            self.procs[device_id] = subprocess.Popen(
                [sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )
        return self.procs[device_id]

    def log_tail(self, device_id: str, chars: int = 600) -> str:
        path = self.config_path(device_id).parent / "agent.log"
        return path.read_text(errors="replace")[-chars:].strip() if path.exists() else "(no log)"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "LocalFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def host_prediction(artifact) -> dict | None:
    """What is predicted for ``artifact``'s model on this host (``targets/host.yaml``, the ``host`` class: the
    machine local agents run on): latency, peak memory, energy and the prediction's basis. An emulated agent's
    measurements are set against it, never against the target's (``pipeline.ota.rollout.too_slow``, and the
    fleet store's comparison, ``pipeline.fleet.accuracy``). None when this host has no profile or the model
    cannot be analysed."""
    from ..profile import HOST, predict_model
    from ..targets import known_targets, load_target

    if HOST not in known_targets():
        return None
    m = artifact.manifest
    with tempfile.TemporaryDirectory(prefix="host-predict-") as tmp:
        path = Path(tmp) / m.filename
        raw = artifact.model_path.read_bytes()
        path.write_bytes(zlib.decompress(raw) if m.encoding == "zlib" else raw)
        try:
            return dict(predict_model(path, load_target(HOST)))
        except Exception as exc:  # the expectation is best effort; without it nothing emulated is judged
            log.warning("no prediction for this host for %s (%s: %s): emulated agents' figures are not judged",
                        m.filename, type(exc).__name__, exc)
            return None
