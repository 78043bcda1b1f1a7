from pathlib import Path

import pytest
import yaml

from pipeline.config import dump_deploy, load_deploy, parse_deploy
from pipeline.errors import ConfigError
from pipeline.targets import load_target, load_target_file, target_for_deploy

from conftest import REPO


def write(tmp_path, data) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def base():
    return yaml.safe_load((REPO / "deploy.yaml").read_text())


def test_repo_deploy_yaml_loads_and_round_trips(base):
    cfg = load_deploy(REPO / "deploy.yaml")
    assert cfg.compress[0].method == "magnitude" and cfg.export.quantize == "int8-static"
    again = parse_deploy(dump_deploy(cfg), cfg.source, cfg.base_dir)
    assert again == cfg


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["export"].update(colour="red"), "export.colour: unknown key"),
    (lambda d: d["export"].update(opset=5), "export.opset: Input should be greater than or equal to 17"),
    (lambda d: d["fleet"].update(local_broker="rabbit"), "fleet.local_broker: got 'rabbit'"),
    (lambda d: d["compress"][0].update(sparsity=1.5), "compress[0] (magnitude)"),
    (lambda d: d["compress"][0].update(spars=0.5), "spars: unknown key"),
    (lambda d: d["compress"][0].update(method="voodoo"), "unknown compression method 'voodoo'; known: lottery, lowrank, magnitude, sensitivity"),
    (lambda d: d["export"].update(quantize="int3"), "export.quantize: got 'int3'; allowed: ['fp16', 'int8-dynamic', 'int8-static', 'none']"),
    (lambda d: d["model"].update(factory="a.b:c"), "exactly one of 'zoo'"),
    (lambda d: d.update(version=7), "version: got 7"),
    (lambda d: d["fleet"].update(devices=["a", {"id": "a", "host": "pi@h"}]), "device ids must be unique; repeated: ['a']"),
    (lambda d: d["fleet"].update(devices=[{"id": "bad/id"}]), "fleet.devices.0.id"),
    (lambda d: d["fleet"].update(devices=[{"id": "a", "hots": "x"}]), "hots: unknown key"),
    (lambda d: d["fleet"].update(retention={"raw": "1h", "bucket": "2h"}), "bucket (7200 s) <= raw (3600 s)"),
    (lambda d: d["fleet"].update(retention={"raw": "a week"}), "fleet.retention.raw: expected a duration"),
    (lambda d: d["fleet"].update(topic_prefix="a/b"), "topic_prefix"),
    (lambda d: d["fleet"].update(store="mysql://db/fleet"), "fleet.store: Value error, the fleet store is SQLite"),
    (lambda d: d["fleet"].update(store=" "), "fleet.store: Value error, expected a postgresql:// URL"),
])
def test_errors_name_file_field_and_allowed(tmp_path, base, change, expected):
    change(base)
    path = write(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        load_deploy(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_deploy(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("version: [1")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_deploy(tmp_path / "bad.yaml")


def test_target_profiles_and_overrides(tmp_path):
    rpi4 = load_target("rpi4")
    assert rpi4.cpu.cores == 4 and rpi4.cpu.core == "Cortex-A72" and rpi4.arch == "aarch64"
    cfg = load_deploy(REPO / "deploy.yaml")
    merged = target_for_deploy(cfg, "rpi4")
    assert merged.budgets.latency_ms == cfg.targets["rpi4"].budgets.latency_ms
    assert rpi4.budgets.latency_ms != merged.budgets.latency_ms
    with pytest.raises(ConfigError, match="unknown target 'toaster'; known: .*rpi4"):
        load_target("toaster")


def test_bad_target_file_names_the_field(tmp_path):
    data = yaml.safe_load((REPO / "targets" / "rpi4.yaml").read_text())
    data["cpu"]["cores"] = 0
    data["cpu"]["turbo"] = True
    path = tmp_path / "rpi4.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_target_file(path)
    assert "cpu.cores" in str(err.value) and "cpu.turbo: unknown key" in str(err.value)


def test_the_inventory_takes_ids_or_entries_and_selects_by_class(tmp_path, base):
    base["fleet"]["devices"] = ["plain", {"id": "pi-1", "target": "rpi4", "host": "pi@10.0.0.5", "groups": ["lab"]},
                                {"id": "pi5-1", "target": "rpi5", "host": "10.0.0.6", "port": 2222}]
    cfg = load_deploy(write(tmp_path, base))
    assert cfg.fleet.device_ids() == ["plain", "pi-1", "pi5-1"]
    assert cfg.fleet.device_ids("rpi4") == ["plain", "pi-1"]  # an entry without a class goes to any
    assert cfg.fleet.device("pi5-1").port == 2222 and cfg.fleet.device("pi-1").groups == ["lab"]
    with pytest.raises(ConfigError, match="fleet.devices has no device 'nope'; it has: plain, pi-1, pi5-1"):
        cfg.fleet.device("nope")


def test_the_fleet_store_is_a_url_a_path_under_the_workdir_or_the_default(tmp_path, base):
    workdir = tmp_path / "work"
    for store, where in ((None, workdir / "fleet.db"), ("fleet/prod.db", workdir / "fleet" / "prod.db"),
                         (str(tmp_path / "abs.db"), tmp_path / "abs.db"),
                         ("postgresql://fleet@db.example/fleet", "postgresql://fleet@db.example/fleet")):
        base["fleet"]["store"] = store
        assert load_deploy(write(tmp_path, base)).fleet.store_at(workdir) == where
