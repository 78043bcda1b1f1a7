"""Shared fixtures: real brokers on free loopback ports, a tiny model, signing keys, local agents.

A missing system component skips a test on a developer's machine (with the reason shown by -ra)
but fails it under CI=true: CI must never go green by skipping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent


def require(available: bool, what: str) -> None:
    if available:
        return
    if CI:
        pytest.fail(f"{what} is missing; CI needs it (the Makefile installs it)")
    pytest.skip(f"{what} is missing (make install installs it)")


@pytest.fixture
def tflite():
    """litert-torch (conversion) and a TFLite interpreter: the [tflite] extra, which `make test` installs."""
    import importlib.util

    require(importlib.util.find_spec("litert_torch") is not None
            and importlib.util.find_spec("ai_edge_litert") is not None, "the [tflite] extra (litert-torch)")


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium (the Debian package the Makefile installs) driven by Playwright; never Playwright's own
    browser download, which cannot work offline."""
    import importlib.util
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require(exe is not None, "chromium (apt-get install chromium)")
    require(importlib.util.find_spec("playwright") is not None, "playwright (pip)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def wait_for_port(port: int, proc, what, timeout: float = 10.0) -> None:
    """Until a server child process accepts connections on loopback ``port``; fails naming ``what()``."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"did not start: {what()}")
            time.sleep(0.1)


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    key: Path  # authorized
    wrong_key: Path  # not authorized


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on a free loopback port: its own host key, key-only authentication, SFTP."""
    import getpass
    import shutil
    import subprocess

    from pipeline.broker import free_port

    exe = shutil.which("sshd") or "/usr/sbin/sshd"
    require(Path(exe).is_file() and shutil.which("ssh-keygen") is not None, "openssh-server (sshd, ssh-keygen)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
    proc = subprocess.Popen([exe, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "wb"))
    wait_for_port(port, proc, lambda: f"sshd: {(d / 'sshd.log').read_text()[-1000:]}")
    yield Sshd(port, getpass.getuser(), d / "client_key", d / "other_key")
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def tls_broker(tmp_path):
    """Mosquitto as `pipeline broker config` sets it up: TLS, client certificates (host, dev-a, dev-b), ACL.
    Yields (address without TLS, identity(name) -> BrokerConfig with that identity, what the command wrote)."""
    import dataclasses
    import json
    import subprocess
    import sys

    from device_agent.config import BrokerConfig
    from pipeline.broker import free_port, mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "broker", "config", "--out", str(tmp_path / "b"),
                          "--port", str(port), "--device", "dev-a", "--device", "dev-b", "--config",
                          str(tmp_path / "none.yaml"), "--json"], capture_output=True, text=True, check=True)
    made = json.loads(out.stdout)
    proc = subprocess.Popen([mosquitto_binary(), "-c", made["config"]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, lambda: "the TLS broker (mosquitto)")
    base = BrokerConfig(host="127.0.0.1", port=port)

    def identity(name: str) -> BrokerConfig:
        ident = made["host"] if name == "host" else made["devices"][name]
        return dataclasses.replace(base, ca_file=made["ca"], cert_file=ident["cert"], key_file=ident["key"])

    yield base, identity, made
    proc.terminate()
    proc.wait(5)


OUTPUT = REPO / "tests" / "_output"  # screenshots and logs a person may want to look at after a run


def small_deploy_config(tmp_path: Path, **fleet) -> Path:
    """The repo's deploy.yaml, scaled down to seconds: digits, 3 epochs, one magnitude step."""
    import yaml

    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["model"]["train"]["epochs"] = 3
    data["data"] = {"name": "digits", "train_size": 1400, "test_size": 397}
    data["compress"] = [{"method": "magnitude", "scope": "global", "sparsity": 0.6, "steps": 2, "finetune_epochs": 1}]
    data["export"]["max_accuracy_drop"] = 0.05
    data["fleet"].update(timeout_s=60, **fleet)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def mosquitto(tmp_path):
    from pipeline.broker import LocalBroker, mosquitto_binary

    require(mosquitto_binary() is not None, "mosquitto")
    with LocalBroker("mosquitto", tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server for the session (tests/postgres.py); each ``fleet_db`` gets its own database."""
    import importlib.util

    from postgres import LocalPostgres, binaries

    require(binaries() is not None, "PostgreSQL (apt-get install postgresql)")
    require(importlib.util.find_spec("psycopg") is not None, "psycopg (pip install 'psycopg[binary]')")
    with LocalPostgres(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg


_DATABASES = iter(range(1 << 30))


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request, tmp_path):
    """Where a fleet store goes, once per engine: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "fleet.db"
    return request.getfixturevalue("postgres").url(f"fleet_{next(_DATABASES)}")


@pytest.fixture
def amqtt_broker(tmp_path):
    from pipeline.broker import LocalBroker

    with LocalBroker("amqtt", tmp_path / "amqtt") as broker:
        yield broker


@pytest.fixture(scope="session")
def tiny_model():
    """A two-layer MLP on 8x8 inputs, with fixed random weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    from pipeline.export import export_model

    return export_model("onnx", tiny_model, (1, 8, 8), tmp_path_factory.mktemp("onnx") / "model.onnx", 17)


@pytest.fixture
def key_dir(tmp_path) -> Path:
    from pipeline.bundle import load_or_create

    d = tmp_path / "keys"
    load_or_create(d)
    return d


def make_artifact(model_path: Path, out: Path, key_dir: Path, version: int, target: str = "rpi4", **kw):
    from pipeline.bundle import build_artifact

    x = np.random.default_rng(version).random((3, 1, 8, 8), dtype=np.float32)
    return build_artifact(model_path, out, name="tiny", version=version, target=target, runtime="onnxruntime",
                          golden_inputs=x, budgets={}, predicted={}, health={"runs": 5}, key_dir=key_dir, **kw)
