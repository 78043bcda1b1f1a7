"""Targets are package data in layers: the user directory overrides the packaged ones and receives calibrations.

The installed wheel itself (no editable install) is checked in tests/test_install.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import targets
from pipeline.errors import ConfigError
from pipeline.targets import (known_targets, load_target, packaged_dir, search_path, target_file, user_dir)

REPO_TARGETS = Path(__file__).resolve().parents[2] / "targets"


@pytest.fixture
def user(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "user-targets"
    monkeypatch.setenv(targets.ENV, str(d))
    return d


def _copy(source: str, to: Path, **changes) -> Path:
    data = {**yaml.safe_load((REPO_TARGETS / f"{source}.yaml").read_text()), **changes}
    to.mkdir(parents=True, exist_ok=True)
    (to / f"{data['name']}.yaml").write_text(yaml.safe_dump(data))
    return to / f"{data['name']}.yaml"


def test_the_packaged_targets_are_the_repositorys_targets_directory(user):
    assert sorted(p.name for p in packaged_dir().glob("*.yaml")) == sorted(p.name for p in REPO_TARGETS.glob("*.yaml"))
    assert known_targets() == sorted(p.stem for p in REPO_TARGETS.glob("*.yaml"))  # the user directory is empty
    assert search_path() == [user, packaged_dir()]


def test_the_user_directory_overrides_a_packaged_target_and_adds_new_ones(user):
    _copy("rpi4", user, description="my own rpi4")
    _copy("rpi4", user, name="my-board", description="a board of mine")
    assert load_target("rpi4").description == "my own rpi4"
    assert target_file("rpi4") == user / "rpi4.yaml"
    assert load_target("my-board").description == "a board of mine"
    assert {"rpi4", "rpi5", "my-board"} <= set(known_targets())
    assert load_target("rpi5").name == "rpi5"  # still the packaged one


def test_an_unknown_target_lists_the_known_ones_and_every_layer(user):
    with pytest.raises(ConfigError) as err:
        load_target("toaster")
    assert "rpi4" in str(err.value) and str(user) in str(err.value) and str(packaged_dir()) in str(err.value)


def test_kernel_measurements_come_from_beside_the_yaml_that_defines_the_target(user):
    assert targets.kernels_file("host") == packaged_dir() / "host.kernels.json"
    assert targets.kernels_file("rpi4") is None
    _copy("host", user)  # calibrated here without kernel measurements: the packaged ones are another machine's
    assert targets.kernels_file("host") is None
    (user / "host.kernels.json").write_text("{}")
    assert targets.kernels_file("host") == user / "host.kernels.json"


def test_the_user_directory_defaults_to_the_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.delenv(targets.ENV, raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_dir() == tmp_path / ".config" / "edgefleet" / "targets"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_dir() == targets.targets_dir() == tmp_path / "xdg" / "edgefleet" / "targets"


def test_a_calibration_is_written_into_the_user_directory_and_wins_there(user):
    from pipeline.profile.calibrate import write_host_yaml

    packaged = load_target("host", packaged_dir())
    result = {"host": packaged.model_copy(update={"description": "calibrated just now"}), "threads": 1,
              "ops": {"conv": {"roofline_factor": 1.25, "overhead_us": 4.0}}, "session_overhead_us": 12.0,
              "fit": {"models": 4, "median_abs_error_pct": 5.0, "within_10pct": 0.75}}
    written = write_host_yaml(result)  # the user directory does not exist yet
    assert written == user / "host.yaml"
    assert target_file("host") == written and load_target("host").description == "calibrated just now"
    assert load_target("host").efficiency.ops["conv"].roofline_factor == 1.25
    assert (packaged_dir() / "host.yaml").read_text() == (REPO_TARGETS / "host.yaml").read_text()  # untouched
