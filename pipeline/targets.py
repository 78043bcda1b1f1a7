"""Device classes as data: ``targets/<name>.yaml`` loaded into one typed profile.

A new target is one file. Facts carry their source in a comment of that file.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Budgets, DeployConfig, _format
from .errors import ConfigError

#: targets/ at the repository root (an editable install), overridable with EDGEFLEET_TARGETS
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "targets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    core: str
    cores: int = Field(ge=1)
    clock_ghz: float = Field(gt=0)
    peak_gflops_fp32: float = Field(gt=0)
    peak_gops_int8: float = Field(gt=0)


class Memory(_Strict):
    ram_mb: float = Field(gt=0)
    bandwidth_gbs: float = Field(gt=0)
    weights_in_flash: bool = Field(False, description="weights are read from flash in place (MCUs, TFLite Micro): "
                                   "they do not count towards peak RAM")


class Power(_Strict):
    idle_w: float = Field(ge=0)
    active_w: float = Field(gt=0)


class OpFactor(_Strict):
    """Calibrated cost of one op category: time = overhead_us + roofline_factor x roofline time."""

    roofline_factor: float = Field(ge=0)
    overhead_us: float = Field(ge=0)


class Efficiency(_Strict):
    fp32: float = Field(gt=0, le=1)
    int8: float = Field(gt=0, le=1)
    per_op_overhead_us: float = Field(ge=0)
    session_overhead_us: float = Field(0.0, ge=0, description="per inference, whatever the model")
    #: per op category, fitted by `pipeline targets calibrate` on the device itself
    ops: dict[str, OpFactor] | None = None


class TargetProfile(_Strict):
    name: str
    description: str
    arch: str
    cpu: Cpu
    memory: Memory
    storage_mb: float = Field(gt=0)
    power: Power
    runtimes: list[str] = Field(min_length=1)
    efficiency: Efficiency
    runtime_overhead_mb: float = Field(ge=0)
    budgets: Budgets

    def with_budgets(self, override: Budgets) -> "TargetProfile":
        merged = {**self.budgets.model_dump(), **override.model_dump(exclude_none=True)}
        return self.model_copy(update={"budgets": Budgets(**merged)})


def targets_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_TARGETS", DEFAULT_DIR))


def known_targets(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (directory or targets_dir()).glob("*.yaml"))


def load_target_file(path: Path) -> TargetProfile:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        profile = TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path))) from None
    if profile.name != path.stem:
        raise ConfigError(f"{path}: name {profile.name!r} must match the file name {path.stem!r}")
    return profile


def load_target(name: str, directory: Path | None = None) -> TargetProfile:
    directory = directory or targets_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(known_targets(directory)) or '(none)'} "
                          f"(one YAML file each in {directory})")
    return load_target_file(path)


def target_for_deploy(cfg: DeployConfig, name: str) -> TargetProfile:
    """The target's profile with deploy.yaml's budget overrides applied; deploy.yaml's own targets/ wins."""
    local = cfg.base_dir / "targets"
    directory = local if (local / f"{name}.yaml").is_file() else None
    profile = load_target(name, directory)
    override = cfg.targets.get(name)
    return profile.with_budgets(override.budgets) if override else profile
