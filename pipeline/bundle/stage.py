"""The bundle stage: the profiled model, signed into an artifact with its golden vectors, budgets and predictions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from device_agent.preprocess import Preprocess
from device_agent.runtimes import runtime_for

from ..profile import ProfileReport
from ..ui import UI
from . import Artifact, build_artifact, next_version, public_key_path
from .drift import REFERENCE_SAMPLES, drift_reference

#: golden input/output pairs the device checks before it activates a model
GOLDEN_CASES = 4


def bundle_stage(model: Path, golden_inputs: np.ndarray, prof: ProfileReport, ui: UI, *, name: str,
                 workdir: Path, key_dir: Path, url_base: str | None = None,
                 preprocess: Preprocess | None = None, labels: tuple[str, ...] | None = None,
                 reference_data: np.ndarray | None = None, reference_samples: int = REFERENCE_SAMPLES,
                 classes: int | None = None, drift_window: int | None = None) -> Artifact:
    """Sign ``model`` as the next version for ``prof``'s target under ``workdir/artifacts`` (the key in
    ``key_dir`` is made on first use); ``url_base``: where the artifacts are served over HTTP, if they are;
    ``preprocess``: the data's spec (how ``golden_inputs`` were prepared), recorded in the manifest; ``labels``: the
    data's class names, recorded there when they fit the model's output; ``reference_data``: the model's data
    (:func:`pipeline.bundle.drift.reference_inputs`), of which at most ``reference_samples`` are summarised into the
    manifest's drift reference (none without it, or with 0); ``classes``: the data's class count (the reference has
    output statistics when the model scores that many); ``drift_window``: the requests the device's drift monitor
    scores over (deploy.yaml ``drift.window``), carried in the reference."""
    reference = None
    if reference_data is not None:
        reference, line = drift_reference(model, reference_data, samples=reference_samples, classes=classes,
                                          layout=preprocess.layout if preprocess is not None else None)
        ui.info(line + (" (signed into the manifest)" if reference is not None else ""))
        if reference is not None and drift_window is not None:
            reference = dataclasses.replace(reference, window=drift_window)
    artifact = build_artifact(
        model, workdir / "artifacts", name=name, version=next_version(workdir), target=prof.target,
        url_base=url_base, runtime=runtime_for(model), golden_inputs=golden_inputs[:GOLDEN_CASES],
        budgets={r.name: r.limit for r in prof.budgets}, predicted=prof.predicted,
        health={"max_rss_mb": None, "max_latency_ms": None, "runs": 20}, key_dir=key_dir, preprocess=preprocess,
        labels=labels, reference=reference)
    ui.info(f"{artifact.dir.name}: {artifact.size_bytes:,} bytes, sha256 {artifact.sha256[:16]}…, "
            f"{artifact.manifest.chunks} chunk(s), signed with {public_key_path(key_dir)}")
    if preprocess is not None:
        ui.info(f"preprocess (signed into the manifest): {preprocess.to_dict()}")
    if artifact.manifest.labels is not None:
        names = artifact.manifest.labels
        ui.info(f"class names (signed into the manifest): {', '.join(names[:8])}{', …' if len(names) > 8 else ''}")
    return artifact
