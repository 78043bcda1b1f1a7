"""deploy.yaml ``fleet.rollout.shadow``: absent means no shadow stage; present, it round-trips, its errors name the
key, and what it signs into the shadow job is what the agent's parser accepts."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from device_agent.quality import Shadow
from pipeline.config import ShadowConfig, dump_deploy, load_deploy, parse_deploy
from pipeline.errors import ConfigError
from pipeline.ota.shadow import ShadowPolicy


def write(tmp_path, data):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def base():
    return yaml.safe_load((REPO / "deploy.yaml").read_text())


def with_shadow(base, **shadow):
    base["fleet"]["rollout"] = {"canary_fraction": 0.5, "shadow": shadow}
    return base


def test_absent_means_no_shadow_stage(tmp_path, base):
    assert load_deploy(write(tmp_path, base)).fleet.rollout.shadow is None


def test_the_defaults_and_a_round_trip(tmp_path, base):
    cfg = load_deploy(write(tmp_path, with_shadow(base)))
    shadow = cfg.fleet.rollout.shadow
    assert shadow == ShadowConfig()
    assert shadow.model_dump() == {"sample": 0.1, "max_cpu": 0.25, "min_agreement": 0.9, "max_distance": None,
                                   "min_samples": 200, "max_latency_ratio": 1.5, "timeout_s": 600, "devices": "canary",
                                   "report_every_s": 5.0}
    assert parse_deploy(dump_deploy(cfg), cfg.source, cfg.base_dir) == cfg


def test_every_key_round_trips_into_the_policy_and_the_signed_leaf(tmp_path, base):
    given = dict(sample=0.5, max_cpu=0.1, min_agreement=0.99, max_distance=0.02, min_samples=50,
                 max_latency_ratio=None, timeout_s=30, devices="all", report_every_s=1.0)
    cfg = load_deploy(write(tmp_path, with_shadow(base, **given)))
    shadow = cfg.fleet.rollout.shadow
    assert shadow.model_dump() == given
    assert parse_deploy(dump_deploy(cfg), cfg.source, cfg.base_dir) == cfg
    assert ShadowPolicy(**shadow.model_dump()).leaf() == shadow.leaf() == Shadow(0.5, 0.1)
    assert Shadow.from_dict(shadow.leaf().to_dict()) == Shadow(0.5, 0.1)  # the agent's parser takes it


@pytest.mark.parametrize("shadow, expected", [
    ({"sample": 0}, "fleet.rollout.shadow.sample: Input should be greater than 0"),
    ({"sample": 1.5}, "fleet.rollout.shadow.sample: Input should be less than or equal to 1"),
    ({"max_cpu": 0}, "fleet.rollout.shadow.max_cpu: Input should be greater than 0"),
    ({"min_agreement": 1.2}, "fleet.rollout.shadow.min_agreement"),
    ({"max_distance": -1}, "fleet.rollout.shadow.max_distance"),
    ({"min_samples": 0}, "fleet.rollout.shadow.min_samples: Input should be greater than or equal to 1"),
    ({"max_latency_ratio": 0}, "fleet.rollout.shadow.max_latency_ratio"),
    ({"timeout_s": 0}, "fleet.rollout.shadow.timeout_s"),
    ({"devices": "some"}, "fleet.rollout.shadow.devices: got 'some'"),
    ({"samples": 10}, "fleet.rollout.shadow.samples: unknown key"),
])
def test_errors_name_the_key(tmp_path, base, shadow, expected):
    path = write(tmp_path, with_shadow(base, **shadow))
    with pytest.raises(ConfigError) as err:
        load_deploy(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
