import pytest

from device_agent.config import load_config
from device_agent.errors import ConfigError

GOOD = """
device_id: pi-1
target: rpi4
state_dir: state
trusted_keys: [keys/signing.pub]
broker: {host: 127.0.0.1, port: 1884}
"""


def test_loads_and_resolves_paths(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.device_id == "pi-1" and cfg.broker.port == 1884 and cfg.broker.protocol == "auto"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.trusted_keys == (tmp_path / "keys" / "signing.pub",)


@pytest.mark.parametrize("extra, message", [
    ("colour: blue\n", r"unknown key\(s\) \['colour'\]"),
    ("threads: 0\n", "'threads' must be >= 1"),
    ("benchmark_runs: many\n", "'benchmark_runs' must be int"),
])
def test_bad_values_name_file_and_field(tmp_path, extra, message):
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD + extra)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_broker_and_ids(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD.replace("port: 1884", "port: 70000"))
    with pytest.raises(ConfigError, match="broker.port 70000"):
        load_config(path)
    path.write_text(GOOD.replace("pi-1", "pi/1"))
    with pytest.raises(ConfigError, match="device_id 'pi/1'"):
        load_config(path)
    path.write_text("device_id: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_systemd_unit_is_shipped_and_filled_in(tmp_path):
    import configparser
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "device_agent.cli", "unit", "--config", "/srv/agent.yaml",
                          "--exec", "/venv/bin/device-agent"], capture_output=True, text=True, check=True).stdout
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(out)
    assert unit["Service"]["ExecStart"] == "/venv/bin/device-agent run --config /srv/agent.yaml"
    assert unit["Service"]["Restart"] == "always" and unit["Install"]["WantedBy"] == "multi-user.target"
