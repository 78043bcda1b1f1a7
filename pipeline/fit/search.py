"""``pipeline fit``: the most accurate model that meets every budget of a device class.

Searches compression (dense; unstructured magnitude at each sparsity; structured at each MAC
reduction) x quantization, each candidate fine-tuned, exported, quantized and judged against the
target's budgets with predicted figures (latency, peak memory, energy) and its file size. Prints
the table with the Pareto front (accuracy vs predicted latency) and draws it to a PNG.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compress.stage import Prepared, compress, prepare
from ..config import CompressStep, DeployConfig
from ..errors import BudgetError, CompressionError, ExportError
from ..export.stage import export_stage
from ..profile import analyse, predict_model
from ..profile.budgets import evaluate, failures
from ..targets import TargetProfile
from ..ui import UI


@dataclass
class Candidate:
    label: str
    steps: list[CompressStep]
    quantize: str
    accuracy: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    pareto: bool = False
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "quantize": self.quantize, "accuracy": self.accuracy, **self.figures,
                "pass": self.passed, "failures": self.failures, "pareto": self.pareto, "error": self.error,
                "steps": [s.model_dump() for s in self.steps]}


@dataclass
class FitResult:
    target: str
    candidates: list[Candidate]
    best: Candidate | None
    plot: Path | None
    prepared: Prepared

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "best": self.best.to_dict() if self.best else None,
                "plot": str(self.plot) if self.plot else None, "candidates": [c.to_dict() for c in self.candidates]}


def search_space(cfg: DeployConfig) -> list[tuple[str, list[CompressStep]]]:
    f = cfg.fit
    space: list[tuple[str, list[CompressStep]]] = [("dense", [])]
    for s in f.sparsities:
        space.append((f"magnitude {s:.0%}", [CompressStep(method="magnitude", sparsity=s, steps=f.steps,
                                                          finetune_epochs=f.finetune_epochs)]))
    for r in f.macs_reductions:
        space.append((f"structured {r:g}x MACs", [CompressStep(method="structured", macs_reduction=r, steps=f.steps,
                                                               round_to=f.round_to,
                                                               finetune_epochs=f.finetune_epochs)]))
    return space


def pareto_front(cands: list[Candidate]) -> None:
    """Mark the candidates no other beats on both accuracy (higher) and predicted latency (lower)."""
    ok = [c for c in cands if c.error is None]
    for c in ok:
        c.pareto = not any(o is not c and o.accuracy >= c.accuracy and o.figures["latency_ms"] <= c.figures["latency_ms"]
                           and (o.accuracy > c.accuracy or o.figures["latency_ms"] < c.figures["latency_ms"])
                           for o in ok)


def run_fit(cfg: DeployConfig, target: TargetProfile, ui: UI, out: Path | None = None) -> FitResult:
    prepared = prepare(cfg.view_compress(), ui)
    out = out or cfg.resolve(cfg.workdir) / "fit" / target.name
    quiet = UI(quiet=True)
    cands: list[Candidate] = []
    space = search_space(cfg)
    for i, (label, steps) in enumerate(space, start=1):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                result = compress(cfg.view_compress(), quiet, steps=steps, prepared=prepared)
        except CompressionError as exc:
            cands += [Candidate(label, steps, q, error=str(exc)) for q in cfg.fit.quantizations]
            ui.info(f"[{i}/{len(space)}] {label}: {exc}")
            continue
        for q in cfg.fit.quantizations:
            c = Candidate(label, steps, q)
            try:
                exported = export_stage(cfg.export, result.model, result.data, out / f"c{i}-{q}", quiet, q)
            except ExportError as exc:
                c.error = str(exc).splitlines()[0]
                cands.append(c)
                continue
            twin = exported.analysis_path or exported.path
            static = analyse(twin)
            static.size_bytes = exported.path.stat().st_size
            p = predict_model(twin, target, static)
            c.accuracy = exported.quantization_report.get("accuracy_quantized", exported.parity["accuracy_onnx"])
            c.figures = {"latency_ms": p["latency_ms"], "peak_memory_mb": p["peak_memory_mb"],
                         "model_size_mb": round(static.size_bytes / 2**20, 4), "energy_mj": p["energy_mj"]}
            rows = evaluate(target.budgets, {k: (v, "predicted") for k, v in c.figures.items()})
            c.failures = failures(rows)
            cands.append(c)
            ui.info(f"[{i}/{len(space)}] {label} + {q}: accuracy {c.accuracy:.2%}, {p['latency_ms']:.3f} ms, "
                    f"{c.figures['model_size_mb']:.3f} MB, {p['energy_mj']:.3f} mJ -> "
                    f"{'fits' if c.passed else 'over: ' + ', '.join(f.split(':')[0] for f in c.failures)}")
    pareto_front(cands)
    passing = [c for c in cands if c.passed]
    best = max(passing, key=lambda c: (c.accuracy, -c.figures["latency_ms"])) if passing else None
    plot = draw(cands, best, target, out / "pareto.png")
    return FitResult(target.name, cands, best, plot, prepared)


def draw(cands: list[Candidate], best: Candidate | None, target: TargetProfile, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ok = [c for c in cands if c.error is None]
    for passed, colour, name in ((True, "tab:green", "meets every budget"), (False, "tab:red", "over a budget")):
        pts = [c for c in ok if c.passed == passed]
        ax.scatter([c.figures["latency_ms"] for c in pts], [100 * c.accuracy for c in pts], c=colour, label=name,
                   s=36, zorder=3)
    front = sorted((c for c in ok if c.pareto), key=lambda c: c.figures["latency_ms"])
    if front:
        ax.plot([c.figures["latency_ms"] for c in front], [100 * c.accuracy for c in front], "--", c="grey",
                label="Pareto front", zorder=2)
    for c in ok:
        ax.annotate(f"{c.label}\n{c.quantize}", (c.figures["latency_ms"], 100 * c.accuracy), fontsize=6,
                    xytext=(4, 2), textcoords="offset points")
    if target.budgets.latency_ms is not None:
        ax.axvline(target.budgets.latency_ms, c="tab:red", lw=1, label=f"latency budget {target.budgets.latency_ms:g} ms")
    if best is not None:
        ax.scatter([best.figures["latency_ms"]], [100 * best.accuracy], s=160, facecolors="none", edgecolors="black",
                   label="chosen", zorder=4)
    ax.set_xlabel(f"predicted latency on {target.name} (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"fit: accuracy vs predicted latency on {target.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def require_best(fit: FitResult, force: bool) -> Candidate:
    if fit.best is not None:
        return fit.best
    ok = [c for c in fit.candidates if c.error is None]
    if not force or not ok:
        raise BudgetError(f"no candidate of the fit search meets every budget of {fit.target}; see {fit.plot}. "
                          "Relax budgets, widen fit.sparsities / fit.macs_reductions, or pass --force to deploy "
                          "the one with the fewest failures", {"fit": fit.to_dict()})
    return min(ok, key=lambda c: (len(c.failures), -c.accuracy))
