"""The user's files that deploy.yaml names (a data file, a model factory, a checkpoint), checked before any work.

A problem is a ConfigError (exit 2) naming deploy.yaml, the field, the file and what is allowed: these are
configuration, and whatever is in them (a missing file, another format, the wrong shape for the model) must
never surface as a traceback. The checks are cheap: the model is built once and run on one zero input.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar


from .config import DeployConfig
from .data import PATH_SOURCES, Dataset, load_dataset
from .errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:  # torch only where a PyTorch model is checked: loading data needs none
    from torch import nn

T = TypeVar("T")
CHECKPOINT_HINT = "expected a state_dict written by torch.save(model.state_dict(), PATH)"


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _guard(cfg: DeployConfig, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; the project's own errors and anything a user file provokes become one ConfigError."""
    try:
        return fn()
    except (ModelError, DataError) as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parser of the user's file: one error type out
        raise ConfigError(f"{cfg.source}: {what} ({_first_line(exc)})") from None


def load_data(cfg: DeployConfig) -> Dataset:
    """The configured dataset, prepared by ``data.preprocess``; the user's file or folder (``data.path``) checked
    for what training needs (pipeline.data: labels, finite values, decodable images), as one ConfigError."""
    d = cfg.data
    options = {"preprocess": d.spec(), "channels": d.channels, "test_fraction": d.test_fraction,
               "cache_dir": cfg.resolve(cfg.workdir) / "data"}
    if d.name not in PATH_SOURCES:  # a built-in: only the sizes or the spec can be wrong (no failed import)
        try:
            return load_dataset(d.name, d.train_size, d.test_size, d.seed, **options)
        except DataError as exc:
            field = "" if str(exc).startswith("data.") else "data: "
            raise ConfigError(f"{cfg.source}: {field}{exc}") from None
    wanted = PATH_SOURCES[d.name]
    path = cfg.resolve(d.path) if d.path else None
    if path is None:
        raise ConfigError(f"{cfg.source}: data.path: required with data.name {d.name} ({wanted})")
    if not path.exists():
        raise ConfigError(f"{cfg.source}: data.path: {path}: no such file or directory; expected {wanted}")
    return _guard(cfg, f"data.path: {path}: cannot be read as {wanted}",
                  lambda: load_dataset(d.name, d.train_size, d.test_size, d.seed, path, **options))


def _factory(cfg: DeployConfig) -> None:
    """``model.factory`` resolves to a callable; otherwise say what the module offers."""
    spec = cfg.model.factory or ""
    module_name, _, attr = spec.partition(":")
    field = f"model.factory {spec!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name != module_name and not module_name.startswith(exc.name + "."):
            raise ConfigError(f"{cfg.source}: {field}: importing {module_name} failed: it needs {exc.name!r}, "
                              "which is not installed") from None
        raise ConfigError(f"{cfg.source}: {field}: no module named {exc.name or module_name!r} on the Python path "
                          f"(set PYTHONPATH to the directory that holds it, e.g. {cfg.base_dir})") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise ConfigError(f"{cfg.source}: {field}: importing {module_name} failed ({_first_line(exc)})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        got = "no" if fn is None else f"a non-callable {type(fn).__name__}"
        raise ConfigError(f"{cfg.source}: {field}: module {module_name} has {got} {attr!r}; its callables: "
                          f"{', '.join(names[:20]) or '(none)'}")


def _state_dict(cfg: DeployConfig) -> tuple[str, Mapping]:
    import torch

    path = cfg.resolve(cfg.model.checkpoint)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"{cfg.source}: model.checkpoint: {path}: {what}; {CHECKPOINT_HINT}, or null "
                          "to train the model")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the file is, one error
        raise ConfigError(f"{cfg.source}: model.checkpoint: {path}: not a PyTorch checkpoint ({_first_line(exc)}); "
                          f"{CHECKPOINT_HINT}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{cfg.source}: model.checkpoint: {path}: holds a {type(state).__name__}, not a "
                          f"state_dict of tensors; {CHECKPOINT_HINT}")
    return str(path), state


def _fits(model: nn.Module, state: Mapping) -> list[str]:
    """Every way a state_dict does not fit the model (missing, unexpected, other shapes), not just the first."""
    own = model.state_dict()
    problems = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return problems


def check_model(cfg: DeployConfig, data: Dataset) -> None:
    """The model deploy.yaml names builds, takes the data's images, gives one score per class, and its
    checkpoint (when given) fits it; raises one ConfigError otherwise. Leaves the global RNG as it was."""
    import torch
    from torch import nn

    from .models import build_model

    m = cfg.model
    if m.file is not None:
        raise ConfigError(f"{cfg.source}: model.file: compressing and fitting need a PyTorch model (model.zoo or "
                          "model.factory); a model file is shipped by `pipeline deploy` as it is or quantized")
    if m.factory is not None:
        _factory(cfg)
    field = f"model.zoo {m.zoo!r}" if m.zoo else f"model.factory {m.factory!r}"
    if m.options:
        field += f" with model.options {m.options}"
    shape = data.input_shape
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. zero-element layers for tiny images: the forward below says it
        model = _guard(cfg, f"{field}: building the model failed",
                       lambda: build_model(m, shape, data.num_classes))
        if not isinstance(model, nn.Module):  # build_model checks it; stay total if it ever does not
            raise ConfigError(f"{cfg.source}: {field}: returned {type(model).__name__}, expected torch.nn.Module")
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros((1, *shape)))
        except Exception as exc:  # noqa: BLE001 - the user's model does not take these inputs
            raise ConfigError(f"{cfg.source}: {field}: cannot run on the images of data.name {cfg.data.name!r} "
                              f"(shape {shape}, channels x height x width): {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{cfg.source}: {field}: returns {got} for one image; expected (1, {data.num_classes}), "
                          f"one score per class of data.name {cfg.data.name!r}")
    if m.checkpoint is not None:
        path, state = _state_dict(cfg)
        problems = _fits(model, state)
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise ConfigError(f"{cfg.source}: model.checkpoint: {path} does not fit {field}: "
                              + "; ".join(problems[:3]) + more + f" ({CHECKPOINT_HINT} for this model)")


def _writable_dir(field: str, path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory this user writes to, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{field}: {path} is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{field}: {path}: not writable by this user"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        return f"{field}: {path}: cannot be created ({parent} is not a directory)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{field}: {path}: cannot be created ({parent} is not writable by this user)"
    return None


def check_fleet_files(cfg: DeployConfig) -> None:
    """The TLS files of ``fleet.broker`` exist and load, the work and key directories can be written: checked
    before a deploy starts, so that none of them fails as a traceback after minutes of compression."""
    import ssl

    problems = [why for field, path in (("workdir", cfg.workdir), ("signing.key_dir", cfg.signing.key_dir))
                if (why := _writable_dir(field, cfg.resolve(path)))]
    broker = cfg.fleet.broker
    hint = "`pipeline broker config --out DIR` writes the CA, certificates and keys"
    files = {k: cfg.resolve(getattr(broker, k)) for k in ("ca_file", "cert_file", "key_file")
             if broker is not None and getattr(broker, k) is not None}
    missing = [k for k, f in files.items() if not f.is_file()]
    problems += [f"fleet.broker.{k}: {files[k]}: no such file; {hint}" for k in missing]
    if "ca_file" in files and "ca_file" not in missing:
        try:
            ssl.create_default_context(cafile=str(files["ca_file"]))
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(f"fleet.broker.ca_file: {files['ca_file']}: not a PEM CA certificate ({_first_line(exc)})")
    if "cert_file" in files and not {"cert_file", "key_file"} & set(missing):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(files["cert_file"]),
                                                                     str(files["key_file"]) if "key_file" in files
                                                                     else None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(f"fleet.broker.cert_file: {files['cert_file']}: not a PEM certificate with its key "
                            f"(key_file) ({_first_line(exc)}); {hint}")
    if len(problems) == 1:
        raise ConfigError(f"{cfg.source}: {problems[0]}")
    if problems:
        raise ConfigError(f"{cfg.source}: invalid configuration\n" + "\n".join(f"  {p}" for p in problems))


__all__ = ["check_fleet_files", "check_model", "load_data"]
