"""`pipeline provision` against a real OpenSSH server on loopback, with a real Mosquitto: install, report
online, deliver a model, provision again (nothing to do), upgrade in place keeping state and the active
model, a failed upgrade that leaves the previous agent running, and one clear error per bad host."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_artifact

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, mosquitto, key_dir: Path, devices: list[dict], broker: dict | None = None,
                 **provision) -> Path:
    data = yaml.safe_load((Path(__file__).parent.parent / "deploy.yaml").read_text())
    data["fleet"] = {"broker": broker or {"host": "127.0.0.1", "port": mosquitto.port}, "devices": devices,
                     "provision": {"metrics_interval_s": 1.0, "online_timeout_s": 60, **provision}}
    data["signing"] = {"key_dir": str(key_dir)}
    data["workdir"] = str(tmp_path / "work")
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(cfg: Path, *args: str, timeout: float = 600) -> tuple[int, object, str]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--config", str(cfg), "--json"],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        out = proc.stdout
    return proc.returncode, out, proc.stderr


def device(sshd, install_dir: Path, **kw) -> dict:
    return {"id": "edge-1", "target": "host", "host": f"{sshd.user}@127.0.0.1", "port": sshd.port,
            "key": str(sshd.key), "install_dir": str(install_dir), "groups": ["lab"], **kw}


def remote_state(install_dir: Path) -> dict:
    proc = subprocess.run([str(install_dir / "current" / "venv" / "bin" / "device-agent"), "status", "--config",
                           str(install_dir / "agent.yaml")], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def agent_processes(install_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(install_dir)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def live(cfg: Path, device_id: str = "edge-1") -> dict:
    code, rows, err = cli(cfg, "devices")
    assert code == 0, err
    return next(r for r in rows if r["device_id"] == device_id)


def wait_live(cfg: Path, check, what: str, timeout: float = 30, device_id: str = "edge-1") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = live(cfg, device_id)
        if check(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the device shows {row}")
        time.sleep(0.5)  # a poll interval, not synchronisation: the loop waits for check(row), each a fresh query


def test_provision_upgrade_and_a_failed_upgrade(mosquitto, sshd, key_dir, tiny_onnx, tmp_path):
    from pipeline.config import load_deploy
    from pipeline.ota.rollout import RolloutPolicy, rollout
    from pipeline.provision import provision
    from pipeline.cli.provision import _fleet_side, _plans

    install = tmp_path / "remote" / "edge-1"
    cfg = write_config(tmp_path, mosquitto, key_dir, [
        device(sshd, install),
        device(sshd, tmp_path / "remote" / "edge-2", id="edge-2", key=str(sshd.wrong_key))])
    try:
        # 1. --all: edge-1 installs and comes online; edge-2's refused key fails alone, the run exits 5
        code, results, err = cli(cfg, "provision", "--all")
        assert code == 5, err[-3000:]
        by_id = {r["device_id"]: r for r in results}
        one, two = by_id["edge-1"], by_id["edge-2"]
        assert one["status"] == "installed", one["error"]
        assert one["service"] == "background" and one["runtime"] == "onnxruntime" and one["machine"] == "x86_64"
        assert two["status"] == "failed" and one["error"] is None
        assert f"{sshd.user}@127.0.0.1:{sshd.port}: authentication refused with the key {sshd.wrong_key}" == two["error"]
        version = one["agent_version"]
        assert (install / "current").resolve().name == version and (install / "state").is_dir()
        row = wait_live(cfg, lambda r: r["online"] and r["agent_version"] == version, "online after provisioning")
        assert row["in_inventory"] and row["target"] == "host" and row["groups"] == ["lab"]

        # 2. a model reaches it over MQTT, like any device's
        artifact = make_artifact(tiny_onnx, tmp_path / "artifact", key_dir, version=7, target="host")
        result = rollout(mosquitto.config, "edgefleet", artifact, ["edge-1"], 60, RolloutPolicy())
        assert [r.status for r in result.results] == ["activated"], result.results[0].reason
        assert remote_state(install)["active"]["version"] == 7

        # 3. provisioning again with nothing changed touches nothing
        pid = (install / "agent.pid").read_text()
        code, results, err = cli(cfg, "provision", "--device", "edge-1")
        assert code == 0, err[-3000:]
        assert results[0]["status"] == "unchanged" and (install / "agent.pid").read_text() == pid

        # 4. a new agent build upgrades in place: state and the active model survive
        loaded = load_deploy(cfg)
        args = type("Args", (), {"host": None, "all": False, "device": ["edge-1"], "key": None, "port": None,
                                 "install_dir": None, "python": None, "target": None, "broker": None,
                                 "timeout": None})()
        plans, fleet = _plans(args, loaded), _fleet_side(args, loaded)
        [up] = provision(plans, fleet, build="gtestupgrade")
        assert up.status == "upgraded" and up.previous_version == version, up.error
        assert up.agent_version == "0.1.0+gtestupgrade"
        assert (install / "current").resolve().name == up.agent_version
        assert remote_state(install)["active"]["version"] == 7  # the model kept across the upgrade
        # the runtime came over from the running release (copied, its files' times kept), not installed again:
        # only the agent's wheel was
        lib = next((install / "releases" / version / "venv" / "lib").glob("python3*")).name
        ort = [install / "releases" / v / "venv" / "lib" / lib / "site-packages" / "onnxruntime" / "__init__.py"
               for v in (version, up.agent_version)]
        assert ort[0].stat().st_mtime == ort[1].stat().st_mtime
        assert (install / "releases" / up.agent_version / "RUNTIME").read_text().strip() == "onnxruntime"
        wait_live(cfg, lambda r: r["online"] and r["agent_version"] == up.agent_version and r["active_version"] == 7,
                  "online with the upgraded agent and the same model")

        # 5. an upgrade whose agent never comes online (it is pointed at a closed port) is undone
        config_before = (install / "agent.yaml").read_text()
        broken = dataclasses.replace(fleet, broker_port=1, online_timeout_s=8)
        [bad] = provision(plans, broken, build="gbroken")
        assert bad.status == "failed" and "did not report online within 8 s" in bad.error
        assert "restored the previous agent (0.1.0+gtestupgrade)" in bad.error
        assert (install / "current").resolve().name == up.agent_version
        assert (install / "agent.yaml").read_text() == config_before
        wait_live(cfg, lambda r: r["online"] and r["agent_version"] == up.agent_version and r["active_version"] == 7,
                  "the previous agent back online")
        # old releases are pruned: the running one and the one before it stay
        assert set(p.name for p in (install / "releases").iterdir()) <= {version, up.agent_version, "0.1.0+gbroken"}

        # 6. the service stops the supervisor and the agent together
        subprocess.run(["sh", str(install / "agentctl"), "stop"], timeout=30, check=True)
        assert agent_processes(install) == []
        wait_live(cfg, lambda r: r["online"] is False, "offline after the service stopped")
    finally:
        if (install / "agentctl").exists():
            subprocess.run(["sh", str(install / "agentctl"), "stop"], timeout=30)
        for pid in agent_processes(install):  # never leave a process behind, whatever failed
            subprocess.run(["kill", "-9", str(pid)])


def test_each_bad_host_gets_its_own_clear_error(mosquitto, sshd, key_dir, tmp_path):
    from pipeline.broker import free_port

    fake_python = tmp_path / "old-python"
    # the probe is a `python -c CODE ROOT`; this stand-in prints what a 3.8 interpreter's probe would print
    fake_python.write_text("#!/bin/sh\nprintf '%s\\n' '{\"machine\": \"x86_64\", \"system\": \"Linux\", \"os\": "
                           "\"Debian 10\", \"python\": [3, 8, 10], \"python_exe\": \"/usr/bin/python3.8\", "
                           "\"glibc\": [2, 28], \"uid\": 1000, \"user\": \"pi\", \"home\": \"/home/pi\", "
                           "\"root\": \"/home/pi/.edgefleet-agent\", \"free_mb\": 9000.0, \"venv\": true, "
                           "\"release\": null, \"systemd\": false, \"systemd_user\": true}'\n")
    fake_python.chmod(0o755)
    base = {"host": f"{sshd.user}@127.0.0.1", "port": sshd.port, "key": str(sshd.key), "target": "host"}
    cfg = write_config(tmp_path, mosquitto, key_dir, [
        {**base, "id": "closed-port", "port": free_port()},
        {**base, "id": "wrong-key", "key": str(sshd.wrong_key)},
        {**base, "id": "wrong-arch", "target": "rpi4"},
        {**base, "id": "old-python", "python": str(fake_python)},
        {**base, "id": "no-python", "python": "python3.99"},
    ], min_free_mb=1e9)
    code, results, err = cli(cfg, "provision", "--all", timeout=120)
    assert code == 5, err[-2000:]
    errors = {r["device_id"]: r["error"] for r in results}
    assert all(r["status"] == "failed" for r in results) and len(errors) == 5
    assert "unreachable (Connection refused)" in errors["closed-port"]
    assert "authentication refused" in errors["wrong-key"]
    assert "unsupported architecture x86_64 for rpi4 (targets/rpi4.yaml says aarch64)" in errors["wrong-arch"]
    assert "unsupported Python 3.8.10 (/usr/bin/python3.8); the agent needs 3.11 or newer" in errors["old-python"]
    assert "no Python ('python3.99' is not on the PATH)" in errors["no-python"]
    for device_id, error in errors.items():  # every line names the host it is about
        assert error.startswith(f"{sshd.user}@127.0.0.1:"), error
    assert "error:" in err and err.count("error:") == 5

    # strict host keys: this sshd's key is in no known_hosts
    from pipeline.errors import ProvisionError
    from pipeline.provision.remote import Remote

    with pytest.raises(ProvisionError, match=r":\d+: unknown host key \(strict host keys"):
        Remote("127.0.0.1", sshd.user, sshd.port, sshd.key, strict_host_keys=True).open()

    # a device that passes every check but lacks the disk space for an install
    cfg = write_config(tmp_path, mosquitto, key_dir, [{**base, "id": "full-disk"}], min_free_mb=1e9)
    code, [result], err = cli(cfg, "provision", "--device", "full-disk", "--install-dir", str(tmp_path / "x"))
    assert code == 5 and "no disk space:" in result["error"] and "1000000000 MB needed" in result["error"]
    assert not (tmp_path / "x").exists()  # nothing was written


def test_provision_over_tls_gives_the_device_its_own_certificate(tls_broker, sshd, key_dir, tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    base, identity, made = tls_broker
    host = identity("host")
    broker = {"host": base.host, "port": base.port, "ca_file": str(host.ca_file), "cert_file": str(host.cert_file),
              "key_file": str(host.key_file)}
    install = tmp_path / "remote" / "edge-tls"
    cfg = write_config(tmp_path, None, key_dir, [device(sshd, install, id="edge-tls")], broker=broker)
    try:
        code, [result], err = cli(cfg, "provision", "--all")
        assert code == 0 and result["status"] == "installed", result["error"] or err[-2000:]
        cert = x509.load_pem_x509_certificate((install / "tls" / "device.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-tls"  # the ACL's %u
        assert (install / "tls" / "device.key").stat().st_mode & 0o777 == 0o600
        agent = yaml.safe_load((install / "agent.yaml").read_text())
        assert agent["broker"]["ca_file"] == "tls/ca.crt" and agent["broker"]["port"] == base.port
        row = wait_live(cfg, lambda r: r["online"], "online over TLS", device_id="edge-tls")
        assert row["agent_version"] == result["agent_version"]
    finally:
        if (install / "agentctl").exists():
            subprocess.run(["sh", str(install / "agentctl"), "stop"], timeout=30)
        for pid in agent_processes(install):
            subprocess.run(["kill", "-9", str(pid)])
