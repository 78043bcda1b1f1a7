"""The names deploy.yaml uses that a registry (or targets/) must know: the zoo model, the data set, the device
classes, the export quantization (for its format) and fit's quantizations.

They are read from the raw document, before and beside the structural pass, so that one ConfigError lists them
with the structural problems. The zoo's names are kept here as a tuple: its registry holds torch code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export.formats import FORMATS, all_quantizations
from ..targets import known_targets
from .errors import short

#: the names of ``pipeline.models.MODELS`` (that registry holds torch code; a test keeps both equal)
ZOO_NAMES = ("ds-cnn", "lenet5", "mobilenetv2", "mobilenetv2-small", "mobilenetv3-small", "resnet-small", "resnet18",
             "small-cnn")


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


def check_names(data: dict[str, Any], base_dir: Path) -> list[str]:
    """Names deploy.yaml uses that a registry (or targets/) must know, read from the raw document so that they
    are reported with the structural problems; one line per problem."""
    from ..data import DATASETS, PATH_SOURCES

    problems = []
    zoo = _at(data, "model", "zoo")
    if isinstance(zoo, str) and zoo not in ZOO_NAMES:
        problems.append(f"model.zoo: got {short(repr(zoo))}; known: {', '.join(ZOO_NAMES)} "
                        "(or model.factory: 'package.module:function' for your own)")
    datasets = [*DATASETS.names(), *PATH_SOURCES]
    name, path = _at(data, "data", "name"), _at(data, "data", "path")
    name = "mnist-5k" if name is None and isinstance(data.get("data", {}), dict) else name
    if isinstance(name, str):
        if name not in datasets:
            problems.append(f"data.name: got {short(repr(name))}; known: {', '.join(datasets)}")
        elif name in PATH_SOURCES and path is None:
            problems.append(f"data.path: required with data.name {name} ({PATH_SOURCES[name]})")
        elif name not in PATH_SOURCES and path is not None:
            problems.append(f"data.path: only read with data.name {' or '.join(PATH_SOURCES)}; data.name is {name!r}")
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
