"""The whole of deploy.yaml (``DeployConfig``) and reading it: bounded, parsed, validated in one pass.

``load_deploy`` reads a file (bounded in size, depth and node count), ``parse_deploy`` validates its data: the
structure, every recipe step and the names registries must know, one ConfigError listing every problem.
``dump_deploy`` is the serialised form, ``json_schema`` the schema of `pipeline config schema`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from ..errors import ConfigError
from .errors import error_lines, invalid, short
from .fleet import FleetConfig
from .names import check_names
from .sections import (DataConfig, DriftConfig, ExportConfig, FinetuneConfig, FitConfig, ModelConfig, SigningConfig,
                       Strict, TargetOverride)
from .steps import Step, TypedStep
from .views import CompressView

CONFIG_VERSION = 1


class DeployConfig(Strict):
    version: Literal[1]
    name: str = "model"
    model: ModelConfig
    data: DataConfig = DataConfig()
    compress: list[Step] = Field(default_factory=list)  # type: ignore[valid-type]
    recipes: dict[str, list[Step]] = Field(default_factory=dict,  # type: ignore[valid-type]
                                           description="named alternatives to 'compress'")
    finetune: FinetuneConfig = FinetuneConfig()
    fit: FitConfig = FitConfig()
    export: ExportConfig = ExportConfig()
    targets: dict[str, TargetOverride] = Field(default_factory=dict)
    fleet: FleetConfig = FleetConfig()
    signing: SigningConfig = SigningConfig()
    drift: DriftConfig = DriftConfig()
    workdir: Path = Path(".edgefleet")

    #: the directory deploy.yaml lives in; relative paths resolve against it
    base_dir: Path = Field(default=Path("."), exclude=True)
    #: the file it was read from, for errors found later (a checkpoint or data file it names)
    source: str = Field(default="deploy.yaml", exclude=True)

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def recipe(self, name: str | None) -> list[TypedStep]:
        return self.view_compress().recipe(name)

    def view_compress(self) -> CompressView:
        """What the compress stage reads: model, data, recipes, fine-tuning and the work directory."""
        return CompressView(self.model, self.data, self.finetune, tuple(self.compress), dict(self.recipes),
                            self.resolve(self.workdir), self.base_dir, self.source)


def parse_deploy(data: Any, where: str, base_dir: Path) -> DeployConfig:
    """deploy.yaml's data (already parsed) into a DeployConfig, or one ConfigError listing every problem: the
    structure, every recipe step's parameters and the names registries must know, in one pass."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level (version: 1, model: ..., ...), "
                          f"got {type(data).__name__}")
    if data.get("version") != CONFIG_VERSION or isinstance(data.get("version"), bool):
        raise ConfigError(f"{where}: version: got {short(repr(data.get('version')))}, this pipeline reads "
                          f"version {CONFIG_VERSION}")
    internal = [k for k in ("base_dir", "source") if k in data]
    if internal:
        raise ConfigError(f"{where}: {internal[0]}: unknown key (set by the pipeline, not in deploy.yaml)")
    structural: list[str] = []
    try:
        cfg = DeployConfig.model_validate({**data, "base_dir": base_dir, "source": where})
    except ValidationError as exc:
        structural = error_lines(exc)
    problems = check_names(data, base_dir)
    if structural:
        raise ConfigError(invalid(where, structural + problems))
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}")
    if problems:
        raise ConfigError(invalid(where, problems))
    return cfg


#: deploy.yaml is read whole; anything bigger or deeper than these is refused before it is validated
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000


def _check_shape(data: Any, where: str) -> None:
    """Bound the parsed document: depth and node count (YAML aliases can make a small file a huge tree)."""
    stack, nodes = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES:,} values (aliases included); "
                              "a deploy.yaml is a few hundred")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for kv in value.items() for v in kv]
        elif isinstance(value, (list, tuple)):
            stack += [(v, depth + 1) for v in value]


def load_deploy(path: str | Path) -> DeployConfig:
    """Read, bound and validate a deployment file; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc}); pass --config PATH") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; is it a deployment file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "a deployment file is YAML in UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-13-01, a float like 1e999999 key
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__}: {exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    _check_shape(data, str(path))
    return parse_deploy(data, str(path), path.resolve().parent)


def json_schema() -> dict[str, Any]:
    """deploy.yaml's JSON Schema (draft 2020-12): every section, and one ``compress:`` step model per method."""
    schema = DeployConfig.model_json_schema()
    for internal in ("base_dir", "source"):  # set by the pipeline, refused in deploy.yaml
        schema["properties"].pop(internal, None)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "deploy.yaml",
            "description": f"edgefleet deployment file, version {CONFIG_VERSION}", **schema}


def dump_deploy(cfg: DeployConfig) -> dict[str, Any]:
    """The serialised form; ``parse_deploy(dump_deploy(c)) == c`` (tested)."""
    return cfg.model_dump(mode="json", exclude={"base_dir"}, exclude_defaults=False)
