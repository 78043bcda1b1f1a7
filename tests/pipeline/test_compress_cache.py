"""The compressed model is reused when nothing that determines it changed, and only then."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.compress import cache as compress_cache, stage as compress_stage
from pipeline.config import load_deploy
from pipeline.ui import UI

from conftest import REPO


class Recorder(UI):
    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def write_cfg(directory, **changes):
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["model"] = {"zoo": "small-cnn",
                     "train": {"epochs": 1, "lr": 0.003, "batch_size": 64, "seed": 0}}
    data["data"] = {"name": "digits", "train_size": 600, "test_size": 200}
    data["compress"] = [{"method": "magnitude", "sparsity": 0.5, "steps": 1, "finetune_epochs": 1}]
    for key, value in changes.items():
        data[key] = value
    path = directory / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_deploy(path)


@pytest.fixture
def cfg(tmp_path):
    return write_cfg(tmp_path)


@pytest.fixture
def prepared(cfg):
    return compress_stage.prepare(cfg.view_compress(), UI(quiet=True))


def test_a_second_run_reuses_the_compressed_model(cfg, prepared, monkeypatch):
    first_ui = Recorder()
    first = compress_stage.compress(cfg.view_compress(), first_ui, prepared=prepared, cache=True)
    assert first.summary["cache"]["reused"] is False
    assert any(line.startswith("compress: cached the compressed model (key ") for line in first_ui.lines)

    def no_compression(*a, **k):
        raise AssertionError("compressed again although nothing changed")

    monkeypatch.setattr(compress_stage, "run_recipe", no_compression)
    ui = Recorder()
    again = compress_stage.compress(cfg.view_compress(), ui, prepared=compress_stage.prepare(cfg.view_compress(), UI(quiet=True)), cache=True)
    key = first.summary["cache"]["key"]
    assert again.summary["cache"] == {"key": key, "reused": True}
    assert [line for line in ui.lines if line.startswith(f"compress: reused cached model (key {key[:12]}")]
    state, cached = first.model.state_dict(), again.model.state_dict()
    assert state.keys() == cached.keys() and all(torch.equal(state[k], cached[k]) for k in state)
    assert [vars(s) for s in again.steps] == json.loads(json.dumps([vars(s) for s in first.steps], default=str))
    for field in ("nonzero_params", "accuracy_after", "macs", "layers"):
        assert again.summary[field] == first.summary[field]
    x = torch.from_numpy(prepared.data.x_test[:8])
    assert torch.equal(first.model.eval()(x), again.model(x))


def test_without_the_cache_nothing_is_read_or_written(cfg, prepared):
    result = compress_stage.compress(cfg.view_compress(), UI(quiet=True), prepared=prepared, cache=False)
    assert "cache" not in result.summary
    assert not compress_cache.cache_dir(cfg.view_compress()).exists()


KEY_CHANGES = {
    "recipe": lambda d: d.update(compress=[{"method": "magnitude", "sparsity": 0.6, "steps": 1, "finetune_epochs": 1}]),
    "finetune": lambda d: d.update(finetune={"lr": 0.0005}),
    "seed": lambda d: d.update(model={"zoo": "small-cnn",
                                      "train": {"epochs": 1, "lr": 0.003, "batch_size": 64, "seed": 1}}),
    "data": lambda d: d.update(data={"name": "digits", "train_size": 600, "test_size": 200, "seed": 3}),
}


@pytest.mark.parametrize("change", sorted(KEY_CHANGES))
def test_what_determines_the_result_changes_the_key(tmp_path, cfg, prepared, change):
    key = compress_cache.cache_key(cfg.view_compress(), cfg.compress, prepared.model, prepared.data)
    data = yaml.safe_load((tmp_path / "deploy.yaml").read_text())
    KEY_CHANGES[change](data)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "deploy.yaml").write_text(yaml.safe_dump(data))
    other = load_deploy(tmp_path / "other" / "deploy.yaml")
    assert compress_cache.cache_key(other.view_compress(), other.compress, prepared.model, compress_stage.load_data(other.view_compress())) != key


def test_weights_code_and_versions_change_the_key(cfg, prepared, monkeypatch):
    key = compress_cache.cache_key(cfg.view_compress(), cfg.compress, prepared.model, prepared.data)
    assert compress_cache.cache_key(cfg.view_compress(), cfg.compress, prepared.model, prepared.data) == key  # stable
    other = compress_stage.prepare(cfg.view_compress(), UI(quiet=True)).model
    with torch.no_grad():  # another checkpoint: one weight differs
        next(other.parameters()).view(-1)[0] += 1e-3
    assert compress_cache.cache_key(cfg.view_compress(), cfg.compress, other, prepared.data) != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert compress_cache.cache_key(cfg.view_compress(), cfg.compress, prepared.model, prepared.data) != key
    monkeypatch.undo()
    monkeypatch.setattr(compress_cache, "code_version", lambda: "edited")
    assert compress_cache.cache_key(cfg.view_compress(), cfg.compress, prepared.model, prepared.data) != key


def test_the_code_version_covers_the_compression_code():
    from pipeline.compress import base
    from pipeline.models import training

    def covered(path: str) -> bool:
        path = Path(path).resolve()
        return any(path == root or root in path.parents for root in compress_cache._CODE)

    for module in (compress_cache, compress_stage, base, training):
        assert covered(module.__file__), module.__name__
    assert len(compress_cache.code_version()) == 16


def test_an_interrupted_store_leaves_no_entry(cfg, prepared, monkeypatch):
    root = compress_cache.cache_dir(cfg.view_compress())

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    result = compress_stage.compress(cfg.view_compress(), UI(quiet=True), prepared=prepared, cache=True)
    assert result.summary["cache"]["reused"] is False  # the deploy went on
    assert list(root.iterdir()) == []  # no entry, no temporary directory


@pytest.mark.slow
def test_a_damaged_entry_is_a_miss(cfg, prepared):
    first = compress_stage.compress(cfg.view_compress(), UI(quiet=True), prepared=prepared, cache=True)
    entry = compress_cache.cache_dir(cfg.view_compress()) / first.summary["cache"]["key"]
    (entry / "model.pt").write_bytes((entry / "model.pt").read_bytes()[:100])
    again = compress_stage.compress(cfg.view_compress(), UI(quiet=True), prepared=prepared, cache=True)
    assert again.summary["cache"]["reused"] is False  # compressed again; the damaged entry stays until evicted
    assert compress_cache.load(compress_cache.cache_dir(cfg.view_compress()), "0" * 64) is None


def test_old_entries_are_evicted(tmp_path):
    root = tmp_path / "cache"
    model = torch.nn.Linear(2, 2)
    for i in range(compress_cache.KEEP + 3):
        assert compress_cache.store(root, f"{i:064x}", model, {"summary": {}, "steps": []}) is not None
    assert len(list(root.iterdir())) == compress_cache.KEEP
    hit = compress_cache.load(root, f"{compress_cache.KEEP + 2:064x}")
    assert hit is not None and torch.equal(hit[0].weight, model.weight)


def test_deploy_no_cache_flag_reaches_the_stage(monkeypatch, tmp_path):
    from pipeline import cli, deploy

    seen = {}

    def fake(cfg, name, ui, force=False, cache=True, model_file=None):
        seen["cache"] = cache
        return {"delivery": []}

    monkeypatch.setattr(deploy, "run_deploy", fake)
    assert cli.main(["deploy", "--config", str(REPO / "deploy.yaml"), "--target", "rpi4", "--no-cache"]) == 0
    assert seen == {"cache": False}
    assert cli.main(["deploy", "--config", str(REPO / "deploy.yaml"), "--target", "rpi4"]) == 0
    assert seen == {"cache": True}
