"""Device classes as data: one YAML per device class, loaded into one typed profile.

A new target is one file. Facts carry their source in a comment of that file. Targets are found in layers,
the first that has a name wins:

1. deploy.yaml's own ``targets/`` (beside it; :func:`target_for_deploy`);
2. the user directory, :func:`user_dir`: ``$EDGEFLEET_TARGETS_DIR``, else ``$XDG_CONFIG_HOME/edgefleet/targets``
   (``~/.config/edgefleet/targets``). Your own device classes go here, and ``pipeline targets calibrate`` writes
   this machine's ``host.yaml`` (and ``host.kernels.json``) here, never into the installation;
3. the packaged ones: the repository's ``targets/``, shipped inside the wheel as the package
   ``pipeline._targets`` (pyproject.toml maps it) and read through :mod:`importlib.resources`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, PipelineError

if TYPE_CHECKING:  # targets know nothing of a deployment; config composes them (config -> targets, never back)
    from .config import DeployConfig


class Budgets(BaseModel):
    """What a device class allows a model: deploy.yaml's ``targets.<class>.budgets`` overrides these."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    latency_ms: float | None = Field(None, gt=0)
    peak_memory_mb: float | None = Field(None, gt=0)
    model_size_mb: float | None = Field(None, gt=0)
    energy_mj: float | None = Field(None, gt=0)


def _format(exc: ValidationError, where: str) -> str:
    """One ``field.path: what is wrong`` line per problem."""
    lines = []
    for err in exc.errors():
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"][:300]
        lines.append(f"{'.'.join(str(p)[:40] for p in err['loc']) or '(top level)'}: {msg}")
    return f"{where}: invalid target\n" + "\n".join(f"  {line}" for line in lines)

#: the package that holds the packaged targets (targets/ in the repository)
PACKAGE = "pipeline._targets"
#: the user directory, when set
ENV = "EDGEFLEET_TARGETS_DIR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    core: str
    cores: int = Field(ge=1)
    clock_ghz: float = Field(gt=0)
    peak_gflops_fp32: float = Field(gt=0)
    peak_gops_int8: float = Field(gt=0)


class Memory(_Strict):
    """The RAM a deployed model holds in the agent's process, beyond ``runtime_overhead_mb`` (Python and the
    runtime): the agent's own modules, a loaded session's fixed cost, the weights as the runtime keeps them (the
    parsed initializers and their prepacked copies), and the activations' arena. The defaults are onnxruntime's,
    measured on this project's x86-64 host over 30 models (MobileNetV2/V3, ResNet-18, DS-CNN, two held-out nets;
    dense, pruned, int8): a least-squares fit of the RSS the agent's process reaches after loading and running
    each, every one of the 30 within 9% (bench/results/memory.json); a fully connected layer's weights, which
    those nets hardly have, from a 4-layer MLP of 24 MB (tests/pipeline/test_memory_prediction.py)."""

    ram_mb: float = Field(gt=0)
    bandwidth_gbs: float = Field(gt=0)
    weights_in_flash: bool = Field(False, description="weights are read from flash in place (MCUs, TFLite Micro): "
                                   "they do not count towards peak RAM")
    agent_mb: float = Field(22.6, ge=0, description="the agent's own modules (MQTT, TLS, signatures, its code) "
                            "beyond Python and the runtime")
    session_mb: float = Field(12.7, ge=0, description="a loaded session's fixed cost (thread pools, allocators)")
    weight_copies_fp32: float = Field(2.94, ge=0, description="resident bytes per byte of a convolution's float "
                                      "weights (parsed, and prepacked for the kernel)")
    weight_copies_int8: float = Field(2.38, ge=0, description="resident bytes per byte of a convolution's int8 "
                                      "weights")
    weight_copies_matmul: float = Field(0.9, ge=0, description="resident bytes per byte of a fully connected "
                                        "layer's weights (read in place)")
    activation_factor: float = Field(0.58, ge=0, description="resident bytes per byte of the peak activations "
                                     "(the arena reuses what the liveness analysis counts twice)")


class Power(_Strict):
    idle_w: float = Field(ge=0)
    active_w: float = Field(gt=0)


class OpFactor(_Strict):
    """Calibrated cost of one op category: time = overhead_us + roofline_factor x roofline time."""

    roofline_factor: float = Field(ge=0)
    overhead_us: float = Field(ge=0)


class Efficiency(_Strict):
    """How close the device's kernels come to its roofline, from the target's own facts (no calibration).

    Uncalibrated, a node takes max(2 x MACs / (peak x share), bytes / memory.bandwidth_gbs) + per_op_overhead_us,
    where share = ``fp32`` (or ``int8``) for a dense convolution or GEMM with a long reduction, times
    K / (K + ``reduction_overhead_macs``) for one whose reduction is K multiply-accumulates per output (first
    layers, grouped convolutions), or times ``depthwise`` for a depthwise convolution. The memory side is not
    derated: ``bandwidth_gbs`` is a measured figure already. Each target's YAML says where its numbers come from.
    """

    fp32: float = Field(gt=0, le=1, description="share of the fp32 peak a dense convolution / GEMM with a long "
                        "reduction reaches at batch 1 with every core busy")
    int8: float = Field(gt=0, le=1, description="the same for int8, of the int8 peak")
    depthwise: float = Field(1.0, gt=0, le=1, description="a depthwise convolution's share of peak relative to "
                             "the dense one's (load-bound: no reuse across output channels); 1 = no separate term")
    reduction_overhead_macs: float = Field(0.0, ge=0, description="per output element, the fixed work of a "
                                           "GEMM-lowered kernel (bias, clamp, store, gathering its inputs) in units "
                                           "of one multiply-accumulate step; 0 = no reduction-length term")
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


def user_dir() -> Path:
    """Where your own targets and calibrations live (it need not exist yet); see the module's docstring."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "edgefleet" / "targets"


def targets_dir() -> Path:
    """Where ``pipeline targets calibrate`` writes: the user directory."""
    return user_dir()


def packaged_dir() -> Path:
    """The targets shipped with edgefleet (the repository's targets/ in an editable install)."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise PipelineError(f"the packaged device classes ({PACKAGE}) are missing: this editable install predates "
                            "them; re-install it (make install, or pip install -e .)") from None
    if not isinstance(root, Path):
        raise PipelineError(f"the packaged device classes are in {root}, not in files; install edgefleet unzipped")
    return root


def search_path() -> list[Path]:
    """The layers :func:`load_target` looks in, first wins: the user directory, then the packaged targets."""
    return [user_dir(), packaged_dir()]


def known_targets(directory: Path | None = None) -> list[str]:
    """Every device class in ``directory``, or in every layer of :func:`search_path`."""
    dirs = [directory] if directory else search_path()
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml")})


def target_file(name: str, directory: Path | None = None) -> Path | None:
    """The YAML file that defines ``name``: the first layer that has it."""
    for d in [directory] if directory else search_path():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    return None


def kernels_file(name: str) -> Path | None:
    """The kernel measurements of a target calibrated in person, if any: the user directory's
    ``<name>.kernels.json`` (``pipeline targets calibrate`` writes it there, for a packaged class too), else the one
    beside the YAML that defines the target. A user YAML without one beside it never takes the packaged one: that
    one measured another machine."""
    mine = user_dir() / f"{name}.kernels.json"
    if mine.is_file():
        return mine
    path = target_file(name)
    kernels = path.with_name(f"{name}.kernels.json") if path else None
    return kernels if kernels and kernels.is_file() else None


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
    """``name`` from ``directory`` alone, or from the first layer of :func:`search_path` that has it."""
    path = target_file(name, directory)
    if path is None:
        where = ", ".join(str(d) for d in ([directory] if directory else search_path()))
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(known_targets(directory)) or '(none)'} "
                          f"(one YAML file each, in {where})")
    return load_target_file(path)


def target_for_deploy(cfg: DeployConfig, name: str) -> TargetProfile:
    """The target's profile with deploy.yaml's budget overrides applied; deploy.yaml's own targets/ wins."""
    local = cfg.base_dir / "targets"
    directory = local if (local / f"{name}.yaml").is_file() else None
    profile = load_target(name, directory)
    override = cfg.targets.get(name)
    return profile.with_budgets(override.budgets) if override else profile


#: the names one architecture goes by (``platform.machine()`` says arm64 on macOS, AMD64 on Windows)
_ARCH_ALIASES = {"arm64": "aarch64", "armv8": "aarch64", "amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64"}


def normal_arch(name: str) -> str:
    """An architecture's one name: ``aarch64``, ``x86_64``, or the name as given, lower case."""
    low = name.strip().lower()
    return _ARCH_ALIASES.get(low, low)
