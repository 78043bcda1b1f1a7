"""Refit a class's kernel predictor from its latest stored suite and the models its fleet measured
(``pipeline targets calibrate --target T --from-fleet``); nothing is timed or shipped here.

- The suite: the latest ``<workdir>/calibration/<T>-v<version>/`` (``results.json``: what each device timed;
  ``suite.json``: what each case is), its whole models read from the signed calibration artifact the run shipped.
  The kernels' forests are fitted on its kernels exactly as the suite's own fit does (``fit.fit_predictor``).
- The fleet: each deployed model version the fleet checks against T's prediction
  (``pipeline.fleet.accuracy.measured_models``), its ONNX file from the artifact the host stored for that version
  (``.edgefleet/artifacts/``), measured as the median over devices of each device's median p50.
- The fit: each precision's whole-model correction by non-negative least squares over the suite's whole models
  and the fleet's models together, relative errors; the fleet's models together carry :data:`FLEET_SHARE` of the
  weight (each at least one suite model's), so a handful of real models decide where they disagree with ~1,500
  suite cases, and the suite still holds what the fleet has not deployed. A refit always starts from the suite,
  so refitting again does not compound.
- The errors, old (the class's predictor as ``pipeline profile`` uses it now) against refit, on the fleet's models
  by the fleet's definition, (measured - predicted) / predicted (as ``pipeline fleet status`` shows it), and on
  the suite's whole models (what the fleet's rows cost the suite).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import statistics
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.calibration import SUITE_FILE, Suite
from device_agent.errors import ProtocolError

from ...errors import ConfigError
from ...targets import TargetProfile
from .block import choose_block
from .build import BuiltSuite
from .fit import combine, fit_correction, kernel_samples, whole_models
from .write import write_kernels

#: the share of each precision's whole-model fit the fleet's models carry together (the suite's models the rest).
#: Four fleet models running 1.5x slower than the suite says come within about 11% after one refit; a fleet that
#: agrees with the suite leaves the predictor where it was (tests/pipeline/test_refit.py)
FLEET_SHARE = 0.8
#: |error| at or under each counts as within it (as the fleet's prediction check counts)
TOLERANCES = (0.10, 0.20)
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class StoredCalibration:
    """A suite calibration as the run left it on the host."""

    target: str
    version: int
    dir: Path
    suite: Suite
    #: device id -> case id -> its figures
    results: dict[str, dict[str, dict[str, Any]]]
    #: the run as ``results.json`` keeps it (devices, their env, job id)
    run: dict[str, Any]
    #: the signed calibration artifact's directory (its payload holds the case files)
    artifact: Path


@dataclass(frozen=True)
class FleetModel:
    """One deployed model version the fleet measured."""

    target: str  # the class it was deployed to
    version: int
    path: Path  # its ONNX file, from the stored artifact
    measured_ms: float  # the median over devices of each device's median p50
    devices: dict[str, float]  # device id -> its median p50
    samples: int


def latest_stored(workdir: Path, target: str) -> StoredCalibration | None:
    """The latest suite calibration of ``target`` under ``workdir/calibration`` (None: there is none). One that
    cannot be read is a ConfigError naming the file."""
    pattern = re.compile(rf"{re.escape(target)}-v(\d+)")
    runs = sorted((int(m.group(1)), p) for p in (workdir / "calibration").glob(f"{target}-v*")
                  if (m := pattern.fullmatch(p.name)) and (p / "results.json").is_file())
    if not runs:
        return None
    version, d = runs[-1]
    try:
        suite = Suite.from_json((d / SUITE_FILE).read_bytes())
        stored = json.loads((d / "results.json").read_text())
    except (OSError, ValueError, ProtocolError) as exc:
        raise ConfigError(f"{d}: the stored calibration cannot be read ({exc}); run `pipeline targets calibrate "
                          f"--target {target}` again") from None
    results = stored.get("results") if isinstance(stored, dict) else None
    if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()) or \
            not isinstance(suite.extra.get("cases"), dict):
        raise ConfigError(f"{d / 'results.json'}: expected the results per device of a suite with its cases; run "
                          f"`pipeline targets calibrate --target {target}` again")
    artifact = Path(stored.get("artifact") or workdir / "artifacts" / f"{target}-calibration-{target}-v{version}")
    return StoredCalibration(target, version, d, suite, results, stored.get("run") or {}, artifact)


def _payload(artifact: Path) -> tuple[bytes, str]:
    """An artifact's model file as it was signed (raw bytes, its file name), checked against the manifest."""
    from ...bundle import load_artifact

    try:
        a = load_artifact(artifact)
        data = a.model_path.read_bytes()
    except (OSError, ValueError, KeyError, ProtocolError) as exc:
        raise ConfigError(f"{artifact}: the stored artifact cannot be read ({type(exc).__name__}: {exc})") from None
    if hashlib.sha256(data).hexdigest() != a.manifest.sha256:
        raise ConfigError(f"{a.model_path}: its sha256 is not the manifest's: the stored artifact was changed")
    return (zlib.decompress(data) if a.manifest.encoding == "zlib" else data), a.manifest.filename


def suite_files(stored: StoredCalibration, out: Path) -> BuiltSuite:
    """The stored suite with its whole models' files extracted from its calibration artifact into ``out``."""
    if not stored.artifact.is_dir():
        raise ConfigError(f"{stored.artifact}: the calibration artifact of {stored.target} v{stored.version} is gone "
                          f"(its whole models are in it); run `pipeline targets calibrate --target {stored.target}`")
    raw, _ = _payload(stored.artifact)
    out.mkdir(parents=True, exist_ok=True)
    cases = stored.suite.extra["cases"]
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        for cid, meta in cases.items():
            if meta.get("role") == "model":
                name = Path(str(meta["file"])).name  # a bare name, never a path out of ``out``
                (out / name).write_bytes(z.read(name))
    return BuiltSuite(stored.suite, out, stored.artifact, 0.0)


def fleet_files(measured: list[dict[str, Any]], out: Path) -> tuple[list[FleetModel], list[dict[str, Any]]]:
    """Each measured version's model from its stored artifact into ``out``; (the models, those left out and why:
    never deployed from this host, artifact gone or unreadable, not an ONNX model)."""
    out.mkdir(parents=True, exist_ok=True)
    models, skipped = [], []
    for m in measured:
        what = {"target": m["target"], "version": m["version"]}
        if not m.get("artifact"):
            skipped.append({**what, "reason": "never deployed from this host (no artifact recorded)"})
            continue
        if not Path(m["artifact"]).is_dir():
            skipped.append({**what, "reason": f"its artifact is gone ({m['artifact']})"})
            continue
        try:
            raw, filename = _payload(Path(m["artifact"]))
        except ConfigError as exc:
            skipped.append({**what, "reason": str(exc)})
            continue
        if not filename.endswith(".onnx"):
            skipped.append({**what, "reason": f"not an ONNX model ({filename})"})
            continue
        path = out / f"{m['target']}-v{m['version']}.onnx"
        path.write_bytes(raw)
        models.append(FleetModel(m["target"], m["version"], path, float(m["measured_ms"]), dict(m["devices"]),
                                 int(m["samples"])))
    return models, skipped


def fleet_weights(suite_models: int, fleet_models: int, share: float = FLEET_SHARE) -> tuple[float, float]:
    """(weight of one suite model, weight of one fleet model) in a precision's fit: the fleet's models together
    ``share`` (in [0, 1)) of the total, each at least one suite model's; with only one kind of row, 1 each."""
    if not 0 <= share < 1:
        raise ValueError(f"share: expected a number in [0, 1), got {share!r}")
    if not suite_models or not fleet_models:
        return 1.0, 1.0
    return 1.0, max(1.0, share / (1 - share) * suite_models / fleet_models)


def fleet_errors(predicted: list[float], measured: list[float]) -> dict[str, Any]:
    """By the fleet's definition, (measured - predicted) / predicted: the median, the median of |error| (percent),
    the shares within each tolerance; a model predicted at nothing (a predictor that prices none of its kernels)
    has no such error and is counted as ``unpredicted``."""
    errors = [(m - p) / p for p, m in zip(predicted, measured) if p > 0]
    unpredicted = sum(1 for p in predicted if not p > 0)
    if not errors:
        return {"models": 0, "unpredicted": unpredicted, "median_error": None, "median_abs_error_pct": None,
                **{f"within_{round(t * 100)}pct": None for t in TOLERANCES}}
    return {"models": len(errors), "unpredicted": unpredicted, "median_error": round(statistics.median(errors), 4),
            "median_abs_error_pct": round(100 * statistics.median(abs(e) for e in errors), 2),
            **{f"within_{round(t * 100)}pct": round(sum(abs(e) <= t + 1e-12 for e in errors) / len(errors), 3)
               for t in TOLERANCES}}


def _figure(ms: float) -> float:
    """Six significant digits: a model that runs in microseconds keeps its figure."""
    return float(f"{ms:.6g}")


def refit(built: BuiltSuite, results: dict[str, dict[str, dict[str, Any]]], fleet: list[FleetModel],
          target: TargetProfile, share: float = FLEET_SHARE) -> dict[str, Any]:
    """The refit predictor and what it was fitted on: {predictor, rows, weights, fleet: {old, refit}, suite_models:
    {old, refit}, models: one row per fleet model}. ``built``: the stored suite with its whole models' files."""
    from .. import predict_model
    from ..kernels import KernelPredictor

    measured = combine(built.suite, results)
    samples = kernel_samples(built.suite, measured)
    if not samples:
        raise ConfigError(f"the stored calibration of {target.name} has no kernel timed: run `pipeline targets "
                          f"calibrate --target {target.name}` again")
    # what the class is predicted with now, before anything is written
    old_fleet = [float(predict_model(m.path, target)["latency_ms"]) for m in fleet]
    suite_cases = whole_models(built, measured)
    old_suite = [float(predict_model(built.file(cid), target)["latency_ms"]) for cid, _, _ in suite_cases]

    predictor = KernelPredictor(samples, block=choose_block(samples)[0])
    rows: dict[str, list[np.ndarray]] = {p: [] for p in PRECISIONS}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    counts: dict[str, dict[str, int]] = {p: {"suite": 0, "fleet": 0} for p in PRECISIONS}
    for cid, precision, ms in suite_cases:
        rows[precision].append(predictor.kind_sums_us(built.file(cid))[0])
        times[precision].append(ms * 1e3)
        counts[precision]["suite"] += 1
    for m in fleet:
        sums, int8 = predictor.kind_sums_us(m.path)
        precision = "int8" if int8 else "fp32"
        rows[precision].append(sums)
        times[precision].append(m.measured_ms * 1e3)
        counts[precision]["fleet"] += 1
    weights: dict[str, dict[str, float]] = {}
    for p in PRECISIONS:
        if not rows[p]:
            continue
        ws, wf = fleet_weights(counts[p]["suite"], counts[p]["fleet"], share)
        w = np.array([ws] * counts[p]["suite"] + [wf] * counts[p]["fleet"])
        predictor.correction[p] = [round(float(c), 5) for c in fit_correction(np.array(rows[p]), np.array(times[p]), w)]
        weights[p] = {"suite_model": ws, "fleet_model": round(wf, 3), **counts[p]}
    predictor.reference_ms = round(measured.reference_ms, 5) if measured.reference_ms else None

    new_fleet = [predictor.predict_ms(m.path) for m in fleet]
    new_suite = [predictor.predict_ms(built.file(cid)) for cid, _, _ in suite_cases]
    measured_suite = [ms for _, _, ms in suite_cases]
    per_model = [{"target": m.target, "version": m.version, "devices": sorted(m.devices), "samples": m.samples,
                  "measured_ms": _figure(m.measured_ms), "old_ms": _figure(o), "refit_ms": _figure(n)}
                 for m, o, n in zip(fleet, old_fleet, new_fleet)]
    return {"predictor": predictor, "share": share, "weights": weights,
            "rows": {"suite_kernels": len(samples), "suite_models": len(suite_cases), "fleet_models": len(fleet)},
            "fleet": {"old": fleet_errors(old_fleet, [m.measured_ms for m in fleet]),
                      "refit": fleet_errors(new_fleet, [m.measured_ms for m in fleet])},
            "suite_models": {"old": fleet_errors(old_suite, measured_suite),
                             "refit": fleet_errors(new_suite, measured_suite)},
            "models": per_model, "threads": built.suite.threads}


def provenance(stored: StoredCalibration, fleet: list[FleetModel], fitted: dict[str, Any],
               wall_s: float) -> dict[str, Any]:
    """What the refit file says of itself (``meta.calibration``): basis ``from_fleet``, the suite run it refits
    (its devices and their environment) and the fleet's model versions and devices it was refit with."""
    devices = [d.get("device_id") for d in stored.run.get("devices") or [] if isinstance(d, dict)]
    envs = {d.get("device_id"): d.get("env") or {} for d in stored.run.get("devices") or [] if isinstance(d, dict)}
    fleet_devices = sorted({d for m in fleet for d in m.devices})
    return {"basis": "from_fleet", "target": stored.target, "date": dt.date.today().isoformat(),
            "time": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "devices": [d for d in devices if d in stored.results] or sorted(stored.results),
            "samples": {d: len(r) for d, r in stored.results.items()},
            "agent_versions": {d: e.get("agent_version") for d, e in envs.items()},
            "runtime_versions": {d: e.get("runtime_version") for d, e in envs.items()},
            "cpu": {d: e.get("cpu") for d, e in envs.items()}, "threads": stored.suite.threads,
            "suite": {"version": stored.version, "results_file": str(stored.dir / "results.json"),
                      "job_id": stored.run.get("job_id")},
            "fleet": {"models": [{"target": m.target, "version": m.version, "devices": sorted(m.devices),
                                  "samples": m.samples, "measured_ms": _figure(m.measured_ms)} for m in fleet],
                      "devices": fleet_devices, "share": fitted["share"]},
            "rows": fitted["rows"], "wall_s": round(wall_s, 1)}


def store_refit(fitted: dict[str, Any], target: TargetProfile, prov: dict[str, Any]) -> dict[str, str]:
    """``<target>.kernels.json`` in the user directory, its provenance under ``meta.calibration``; returns what
    was written."""
    refit_errors = fitted["fleet"]["refit"]
    meta = {"kernels": fitted["rows"]["suite_kernels"], "reference_ms": fitted["predictor"].reference_ms,
            "models": fitted["rows"]["suite_models"] + fitted["rows"]["fleet_models"],
            "median_abs_error_pct": refit_errors["median_abs_error_pct"], "within_10pct": refit_errors["within_10pct"],
            "threads": fitted["threads"], "date": prov["date"],
            "calibration": {**prov, "fit": {"fleet": fitted["fleet"], "suite_models": fitted["suite_models"],
                                            "weights": fitted["weights"]}}}
    return {"kernels": str(write_kernels(fitted["predictor"], target.name, meta))}


__all__ = ["FLEET_SHARE", "FleetModel", "StoredCalibration", "fleet_errors", "fleet_files", "fleet_weights",
           "latest_stored", "provenance", "refit", "store_refit", "suite_files"]
