"""deploy.yaml, loaded into validated, frozen pydantic models.

Every model forbids unknown keys; a validation failure becomes one ConfigError that names the
file, the field path and what is allowed, one line per problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from ..errors import ConfigError
from ..targets import known_targets
from ..export.formats import FORMATS, all_quantizations
from .errors import error_lines, invalid, short
from .fleet import FleetConfig
from .sections import (DataConfig, ExportConfig, FinetuneConfig, FitConfig, ModelConfig, SigningConfig, Strict,
                       TargetOverride)
from .steps import Step, TypedStep

CONFIG_VERSION = 1
#: the names of ``pipeline.models.MODELS`` (that registry holds torch code; a test keeps both equal)
ZOO_NAMES = ("lenet5", "mobilenetv2-small", "resnet-small", "small-cnn")


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
    workdir: Path = Path(".edgefleet")

    #: the directory deploy.yaml lives in; relative paths resolve against it
    base_dir: Path = Field(default=Path("."), exclude=True)
    #: the file it was read from, for errors found later (a checkpoint or data file it names)
    source: str = Field(default="deploy.yaml", exclude=True)

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def recipe(self, name: str | None) -> list[TypedStep]:
        if name is None or name == "default":
            return list(self.compress)
        if name not in self.recipes:
            raise ConfigError(f"unknown recipe {name!r}; deploy.yaml defines: "
                              f"{', '.join(['default', *sorted(self.recipes)])}")
        return list(self.recipes[name])


def _known_classes(base_dir: Path) -> list[str]:
    """Device classes: the YAML files in targets/ (and in deploy.yaml's own targets/, which wins)."""
    local = base_dir / "targets"
    return sorted(set(known_targets()) | (set(known_targets(local)) if local.is_dir() else set()))


def _at(data: Any, *path: str) -> Any:
    """``data[path...]`` where every level is a mapping, else None (the structural pass reports the rest)."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _check_names(data: dict[str, Any], base_dir: Path) -> list[str]:
    """Names deploy.yaml uses that a registry (or targets/) must know, read from the raw document so that they
    are reported with the structural problems; one line per problem."""
    from ..data import DATASETS

    problems = []
    zoo = _at(data, "model", "zoo")
    if isinstance(zoo, str) and zoo not in ZOO_NAMES:
        problems.append(f"model.zoo: got {short(repr(zoo))}; known: {', '.join(ZOO_NAMES)} "
                        "(or model.factory: 'package.module:function' for your own)")
    datasets = [*DATASETS.names(), "npz"]
    name, path = _at(data, "data", "name"), _at(data, "data", "path")
    name = "mnist-5k" if name is None and isinstance(data.get("data", {}), dict) else name
    if isinstance(name, str):
        if name not in datasets:
            problems.append(f"data.name: got {short(repr(name))}; known: {', '.join(datasets)}")
        elif name == "npz" and path is None:
            problems.append("data.path: required with data.name npz (a .npz file with x_train, y_train, x_test, "
                            "y_test)")
        elif name != "npz" and path is not None:
            problems.append(f"data.path: only read with data.name npz; data.name is {name!r}")
    classes = _known_classes(base_dir)
    allowed = f"known device classes: {', '.join(classes) or '(none)'} (one YAML file each in targets/)"
    targets = data.get("targets")
    if isinstance(targets, dict):
        problems += [f"targets.{short(n, 40)}: unknown device class {short(repr(n))}; {allowed}"
                     for n in targets if isinstance(n, str) and n not in classes]
    devices = _at(data, "fleet", "devices")
    if isinstance(devices, list):
        problems += [f"fleet.devices.{i}.target: unknown device class {short(repr(d['target']))}; {allowed}"
                     for i, d in enumerate(devices)
                     if isinstance(d, dict) and isinstance(d.get("target"), str) and d["target"] not in classes]
    kinds = all_quantizations()
    fmt, quantize = _at(data, "export", "format"), _at(data, "export", "quantize")
    fmt = "onnx" if fmt is None and isinstance(data.get("export", {}), dict) else fmt
    if isinstance(quantize, str):
        if quantize not in kinds:
            problems.append(f"export.quantize: got {short(repr(quantize))}; allowed: {kinds}")
        elif isinstance(fmt, str) and fmt in FORMATS and quantize not in FORMATS[fmt].quantizations:
            f = FORMATS[fmt]
            problems.append(f"export.quantize: got {quantize!r}; with format {fmt}: {sorted(f.quantizations)}"
                            + (f" ({f.note})" if f.note else ""))
    fit_kinds = _at(data, "fit", "quantizations")
    if isinstance(fit_kinds, list):
        unknown = [q for q in fit_kinds if isinstance(q, str) and q not in kinds]
        if unknown:
            problems.append(f"fit.quantizations: got {short(repr(unknown))}; allowed: {kinds}")
    return problems


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
    problems = _check_names(data, base_dir)
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
