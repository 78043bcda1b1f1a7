"""The calibration suite a device class is timed on, as the agent takes it (``device_agent.calibration``).

Every case is an ONNX file with a batch-1 float input:

- each single kernel of :func:`kernel_configs` twice, its cheap prefix alone (``k<i>p``) and prefix + kernel
  (``k<i>``), and where :func:`int8_too` says also as int8 (``k<i>qp``, ``k<i>q``): the kernel's time in context
  is T(prefix + kernel) - T(prefix), so both files of a kernel sit in one group and are timed interleaved (an
  elementwise kernel has a cheap suffix in both files, ``suite.kernel_suffix``: it is timed between two
  convolutions, as networks run it);
- whole random networks of :func:`calibration_models`, fp32 (``m<j>``) and int8 (``m<j>q``): the fits' ground
  truth (the per-precision correction of the kernel predictor, the op factors);
- the peak cases of :mod:`.peaks` (``peak-fp32``, ``peak-int8``, ``bandwidth``);
- the speed probe (``probe<g>``, one per group, every one the same file): the device's speed at that moment, so
  groups timed minutes apart can be set on one scale.

The suite's ``extra`` is what the host needs to read the answers back: per case id its role, kernel, model and
precision. Its ``budget_s`` bounds the run on the device; the suite is sized (``runs`` per round) from each
case's predicted latency on the target so that the estimate stays within :data:`BUDGET_SHARE` of it.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.calibration import SUITE_FILE, Case, Suite

from ...errors import ConfigError
from ...targets import TargetProfile

log = logging.getLogger(__name__)

#: named sizes: ``tiny`` takes seconds (tests), ``small`` a few minutes, ``full`` the suite a device class is
#: calibrated with (~2,000 cases; a Pi-class device times it within the default budget)
SCALES = {"tiny": 0.02, "small": 0.25, "full": 1.0}
#: whole models at scale 1 (each fp32 and int8)
MODELS = 32
#: cases per group, besides its probe (a kernel's files are never split across groups)
GROUP_SIZE = 20
#: the default bound of a suite's time on the device
DEFAULT_BUDGET_S = 900.0
#: the share of the budget the estimate may use (the estimate is a prediction; the budget is a hard stop)
BUDGET_SHARE = 0.7
#: per case, what the device spends besides its runs (loading the session, making the input, reporting): ~0.1 s
#: measured on this x86 host (the small suite: 382 cases in 39 s, 20 s of them runs); a Pi-class CPU is slower
LOAD_S = 0.25
#: the compute kernels that are also timed as int8 (as deploy quantizes them: QDQ, per-channel weights): every other
#: one, and every one with few input or output channels, grouped, or of at least :data:`INT8_ALL_MACS` MACs (the
#: layers that decide a 224-pixel network's time)
INT8_KINDS = ("conv", "dwconv", "gemm")
INT8_ALL_MACS = 40e6
#: the other kernels timed as int8 too, every other one (an int8 graph runs them as int8 kernels or between Q/DQ)
INT8_OTHER_KINDS = ("pool", "gpool", "add", "eltwise")


def int8_too(i: int, k) -> bool:
    """Whether the suite's ``i``-th kernel ``k`` is also timed as int8."""
    if k.kind in INT8_KINDS:
        return i % 2 == 0 or k.cin <= 3 or k.cout < 16 or k.macs >= INT8_ALL_MACS or k.groups > 1
    # an int8 graph runs Hardswish as HardSigmoid and Mul, each priced by its own samples
    return k.kind in INT8_OTHER_KINDS and i % 2 == 0 and k.op != "hardswish"


def parse_scale(value: str | float) -> float:
    """A named size (:data:`SCALES`) or a positive number (1 = ``full``)."""
    if isinstance(value, (int, float)):
        scale = float(value)
    elif value in SCALES:
        scale = SCALES[value]
    else:
        try:
            scale = float(value)
        except ValueError:
            raise ConfigError(f"--scale: expected one of {', '.join(SCALES)} or a number, got {value!r}") from None
    if not math.isfinite(scale) or not 0 < scale <= 8:
        raise ConfigError(f"--scale: expected a number in (0, 8], got {value!r}")
    return scale


@dataclass(frozen=True)
class BuiltSuite:
    suite: Suite
    #: the case files, kept on the host: the fits read the whole models' graphs
    dir: Path
    #: the payload of the calibration artifact: suite.json and the files
    zip_path: Path
    #: the predicted time on the device, seconds
    estimate_s: float

    def case(self, case_id: str) -> dict[str, Any]:
        return self.suite.extra["cases"][case_id]

    def file(self, case_id: str) -> Path:
        return self.dir / self.case(case_id)["file"]

    def to_dict(self) -> dict[str, Any]:
        roles: dict[str, int] = {}
        for c in self.suite.extra["cases"].values():
            roles[c["role"]] = roles.get(c["role"], 0) + 1
        return {"name": self.suite.name, "cases": len(self.suite.cases), "groups": len(self.suite.groups()),
                "roles": roles, "scale": self.suite.extra["scale"], "threads": self.suite.threads,
                "rounds": self.suite.rounds, "runs": self.suite.runs, "warmup": self.suite.warmup,
                "budget_s": self.suite.budget_s, "estimate_s": round(self.estimate_s, 1),
                "zip_bytes": self.zip_path.stat().st_size}


def _int8(src: Path, dst: Path, x: np.ndarray) -> Path:
    """int8 as deploy makes it: the ``int8-static`` quantizer, then the same clean-up."""
    from ...export.onnx_files import minify
    from ...export.quantize import QUANTIZERS

    QUANTIZERS.get("int8-static")(src, dst, x)
    minify(dst)
    return dst


class _Files:
    """The case files as they are made, and what each case means."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.meta: dict[str, dict[str, Any]] = {}
        self.units: list[list[str]] = []  # cases that share a group

    def export(self, case_id: str, module, shape: tuple[int, ...], **meta: Any) -> Path:
        from ...export import export_model

        path = export_model("onnx", module, shape, self.out / f"{case_id}.onnx", 17)
        self.meta[case_id] = {"file": path.name, "shape": [1, *shape], **meta}
        return path

    def quantize(self, case_id: str, src: Path, shape: tuple[int, ...], x: np.ndarray, **meta: Any) -> Path:
        path = _int8(src, self.out / f"{case_id}.onnx", x)
        self.meta[case_id] = {"file": path.name, "shape": [1, *shape], **meta}
        return path


def _kernels(files: _Files, scale: float, progress: Callable[[str], None]) -> None:
    import torch
    from torch import nn

    from .suite import kernel_configs, kernel_module, kernel_prefix, kernel_suffix

    configs = kernel_configs(0, scale)
    for i, k in enumerate(configs):
        torch.manual_seed(i)
        module, shape = kernel_module(k)
        prefix = kernel_prefix(k).eval()
        before, after = kernel_suffix(k, after=False), kernel_suffix(k, after=True)
        pre = files.export(f"k{i}p", nn.Sequential(prefix, before).eval() if before else prefix, shape, role="prefix",
                           kernel=k.to_dict(), pair=f"k{i}")
        full = files.export(f"k{i}", nn.Sequential(prefix, module, *([after] if after else [])).eval(), shape,
                            role="kernel", kernel=k.to_dict(), pair=f"k{i}p")
        unit = [f"k{i}p", f"k{i}"]
        if int8_too(i, k):
            x = np.random.default_rng(i).random((4, *shape), dtype=np.float32)
            q = {**k.to_dict(), "int8": True}
            files.quantize(f"k{i}qp", pre, shape, x, role="prefix", kernel=q, pair=f"k{i}q")
            files.quantize(f"k{i}q", full, shape, x, role="kernel", kernel=q, pair=f"k{i}qp")
            unit += [f"k{i}qp", f"k{i}q"]
        files.units.append(unit)
        if (i + 1) % 50 == 0 or i + 1 == len(configs):
            progress(f"suite: {i + 1}/{len(configs)} kernels exported")


def _models(files: _Files, count: int, progress: Callable[[str], None]) -> None:
    from .suite import calibration_models

    for j, (name, model, shape) in enumerate(calibration_models(count, seed=100)):
        x = np.random.default_rng(j).random((16, *shape), dtype=np.float32)
        fp32 = files.export(f"m{j}", model, shape, role="model", model=name, precision="fp32")
        files.quantize(f"m{j}q", fp32, shape, x, role="model", model=name, precision="int8")
        files.units.append([f"m{j}", f"m{j}q"])
    progress(f"suite: {count} whole models exported (fp32 and int8)")


def _peaks(files: _Files) -> None:
    from .peaks import peak_modules

    made: dict[str, Path] = {}
    for case_id, module, shape, int8 in peak_modules():
        if int8:
            x = np.random.default_rng(0).random((8, *shape), dtype=np.float32)
            files.quantize(case_id, made["peak-fp32"], shape, x, role="peak", precision="int8")
        else:
            made[case_id] = files.export(case_id, module, shape, role="peak", precision="fp32")
    files.units.append([case_id for case_id, *_ in peak_modules()])


def _probe(files: _Files) -> dict[str, Any]:
    import torch
    from torch import nn

    from ...export import export_model

    torch.manual_seed(1234)  # the same reference model as profile.compare.SpeedProbe
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10)).eval()
    path = export_model("onnx", model, (1, 28, 28), files.out / "probe.onnx", 17)
    return {"file": path.name, "shape": [1, 1, 28, 28], "role": "probe"}


def _spread(kernels: list[list[str]], models: list[list[str]]) -> list[list[str]]:
    """The kernels' units with the whole models' spread evenly among them. The models are the ground truth the
    kernels' correction is fitted against: timed at the end they saw a different machine from the kernels whenever
    the load changed while the suite ran (a host calibration under a load that fell from 15 to 11 fitted int8
    convolutions a factor of 0.56), timed among them they see, on average, the same."""
    out: list[list[str]] = []
    step, j = len(kernels) / (len(models) + 1), 0
    for i, unit in enumerate(kernels, 1):
        out.append(unit)
        while j < len(models) and i >= step * (j + 1):  # model j after the (j + 1)th share of the kernels
            out.append(models[j])
            j += 1
    return out + models[j:]


def _groups(units: list[list[str]]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    for unit in units:
        if groups[-1] and len(groups[-1]) + len(unit) > GROUP_SIZE:
            groups.append([])
        groups[-1] += unit
    return groups


def estimate_ms(path: Path, target: TargetProfile) -> float:
    """A case's latency on the target as predicted before it was ever calibrated (the roofline)."""
    from ..predict import predict
    from ..static import analyse

    return float(predict(analyse(path), target)["latency_ms"])


def estimate_s(latencies_ms: list[float], rounds: int, runs: int, warmup: int) -> float:
    return sum(LOAD_S + (warmup + rounds * runs) * ms / 1e3 for ms in latencies_ms)


def build_suite(target: TargetProfile, out: Path, *, scale: float = 1.0, threads: int | None = None,
                budget_s: float = DEFAULT_BUDGET_S, rounds: int = 5, runs: int = 20, warmup: int = 3,
                progress: Callable[[str], None] = log.info) -> BuiltSuite:
    """The suite for ``target`` at ``scale`` under ``out`` (its files in ``out/files``, the payload
    ``out/<target>-calibration.zip``). ``runs`` is lowered (to 3 at least) when the estimate would pass
    :data:`BUDGET_SHARE` of ``budget_s``."""
    files_dir = out / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    files = _Files(files_dir)
    _kernels(files, scale, progress)
    kernel_units = len(files.units)
    _models(files, max(4, round(MODELS * scale)), progress)
    files.units = _spread(files.units[:kernel_units], files.units[kernel_units:])
    _peaks(files)
    probe = _probe(files)
    groups = _groups(files.units)
    cases = []
    for g, ids in enumerate(groups):
        files.meta[f"probe{g}"] = probe
        for case_id in [f"probe{g}", *ids]:
            m = files.meta[case_id]
            cases.append(Case(id=case_id, file=m["file"], shape=tuple(m["shape"]), group=g))
    by_file: dict[str, float] = {}
    for c in cases:
        if c.file not in by_file:
            by_file[c.file] = estimate_ms(files_dir / c.file, target)
    latencies = [by_file[c.file] for c in cases]
    estimate = estimate_s(latencies, rounds, runs, warmup)
    if estimate > BUDGET_SHARE * budget_s:
        room = BUDGET_SHARE * budget_s - LOAD_S * len(cases)
        fit = int((room / max(sum(latencies) / 1e3, 1e-9) - warmup) / rounds)
        runs = max(3, min(runs, fit))
        estimate = estimate_s(latencies, rounds, runs, warmup)
        if estimate > budget_s:
            log.warning("the %s suite is predicted to take %.0f s on %s, past its budget of %.0f s: the device "
                        "will stop at the budget and report what it timed", target.name, estimate, target.name,
                        budget_s)
    extra = {"target": target.name, "scale": scale, "estimate_s": round(estimate, 1), "cases": files.meta}
    suite = Suite(name=f"{target.name}-calibration", cases=tuple(cases), threads=threads, rounds=rounds, runs=runs,
                  warmup=warmup, budget_s=float(budget_s), extra=extra)
    Suite.from_json(suite.to_json())  # the agent's own parser: refuse here what the device would refuse
    zip_path = out / f"{target.name}-calibration.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(SUITE_FILE, suite.to_json())
        for name in sorted({c.file for c in cases}):
            z.write(files_dir / name, name)
    progress(f"suite: {len(cases)} cases in {len(groups)} groups, predicted {estimate:.0f} s on {target.name} "
             f"({rounds} rounds x {runs} runs; budget {budget_s:.0f} s)")
    return BuiltSuite(suite, files_dir, zip_path, estimate)


__all__ = ["BuiltSuite", "SCALES", "build_suite", "estimate_ms", "parse_scale"]
