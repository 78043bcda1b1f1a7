"""A local MQTT broker as a child process on a free loopback port: Mosquitto when installed, else amqtt.

amqtt speaks MQTT 3.1.1 only; clients negotiate (device_agent.mqtt), so everything works on both.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from device_agent.config import BrokerConfig

from ..errors import DeliveryError
from ..registry import Registry

log = logging.getLogger(__name__)

#: name -> f(workdir, port, persistent) that writes any config and returns (command line, MQTT protocol it speaks);
#: ``persistent``: sessions, queued messages and retained ones survive a graceful stop (SIGTERM) and start
BROKERS: Registry[Callable[[Path, int, bool], tuple[list[str], str]]] = Registry("local broker")


def external_broker(cfg) -> BrokerConfig | None:
    """deploy.yaml's ``fleet.broker`` as the agent library's BrokerConfig (paths resolved), or None."""
    b = cfg.fleet.broker
    if b is None:
        return None
    return BrokerConfig(b.host, b.port, b.protocol, **{k: cfg.resolve(getattr(b, k))
                                                      for k in ("ca_file", "cert_file", "key_file")
                                                      if getattr(b, k) is not None})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)


@BROKERS.register("mosquitto")
def _mosquitto(workdir: Path, port: int, persistent: bool = False) -> tuple[list[str], str]:
    binary = mosquitto_binary()
    if binary is None:
        raise DeliveryError("mosquitto is not installed; `make install` installs it (apt-get install mosquitto), "
                            "or set fleet.local_broker: amqtt")
    conf = workdir / "mosquitto.conf"
    # saved on SIGTERM (and every 60 s) in workdir; run as this process's user, who owns workdir (started as
    # root, mosquitto would switch to its own user, which cannot write there)
    keep = (f"persistence true\npersistence_location {workdir.resolve()}/\nautosave_interval 60\n"
            f"user {getpass.getuser()}\n") if persistent else "persistence false\n"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"{keep}"
        # bulk transfer: the defaults (20 in flight, 1000 queued) drop chunks under load
        "max_inflight_messages 200\n"
        "max_queued_messages 100000\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\n"
    )
    return [binary, "-c", str(conf)], "5"


@BROKERS.register("amqtt")
def _amqtt(workdir: Path, port: int, persistent: bool = False) -> tuple[list[str], str]:
    if persistent:
        raise DeliveryError("the embedded amqtt broker keeps nothing across a restart; a persistent local broker "
                            "needs mosquitto (apt-get install mosquitto)")
    return [sys.executable, "-m", "pipeline.broker.embedded", "--port", str(port)], "3.1.1"


class LocalBroker:
    """Context manager: ``with LocalBroker("auto", workdir) as b: b.config``.

    ``persistent``: the broker saves its sessions, queued QoS 1 messages and retained messages in ``workdir`` when
    stopped, and a :meth:`restart` starts from them (mosquitto only)."""

    def __init__(self, kind: str, workdir: Path, persistent: bool = False) -> None:
        if kind == "auto":
            kind = "mosquitto" if mosquitto_binary() else "amqtt"
        BROKERS.get(kind)
        self.kind = kind
        self.workdir = workdir
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.protocol = "auto"

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host="127.0.0.1", port=self.port, protocol=self.protocol)

    def start(self, timeout: float = 15.0, port: int | None = None) -> "LocalBroker":
        """Start on a free loopback port, or on ``port`` (a restart keeps the address clients know)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        errors = []
        for _ in range(1 if port else 3):  # another process may grab the free port between probe and bind
            self.port = port or free_port()
            cmd, self.protocol = BROKERS.get(self.kind)(self.workdir, self.port, self.persistent)
            logfile = open(self.workdir / f"{self.kind}.log", "wb")
            self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            logfile.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    log.info("%s broker on 127.0.0.1:%d", self.kind, self.port)
                    return self
                except OSError:
                    time.sleep(0.1)  # poll interval: until the broker answers on its port
            tail = (self.workdir / f"{self.kind}.log").read_text(errors="replace")[-400:]
            errors.append(f"port {self.port}: {tail.strip() or 'no answer'}")
            self.stop()
        raise DeliveryError(f"local {self.kind} broker did not start: " + " | ".join(errors))

    def restart(self, timeout: float = 15.0) -> "LocalBroker":
        """Stop and start again on the same port: clients see their connection drop and come back."""
        self.stop()
        return self.start(timeout, port=self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
