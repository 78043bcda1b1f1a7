"""The user's own data: image folders (Pillow), memory-mapped .npz, the preprocess spec applied to every split and
signed into the manifest, and every bad input one ConfigError naming deploy.yaml, the field and the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image as PIL  # noqa: N812 - a host dependency (pyproject), never skipped

from conftest import REPO, make_artifact
from device_agent.preprocess import Preprocess
from pipeline.config import parse_deploy
from pipeline.data import load_dataset
from pipeline.data.npz import open_npz
from pipeline.errors import ConfigError, DataError, ExportError
from pipeline.inputs import check_model, load_data


def image(path: Path, size=(6, 8), seed=0, mode="RGB") -> Path:
    """A random PNG (or JPEG, by suffix) of ``size`` (height, width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    PIL.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def folder(root: Path, classes=("cat", "dog", "emu"), per_class=4, split=True, size=(6, 8)) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            for part in (("train", "test") if split else ("",)):
                suffix = ".jpg" if i == 1 else ".png"
                image(root / part / name / f"{i}{suffix}", size, seed=100 * c + i + (7 if part == "test" else 0))
    return root


def config(tmp_path: Path, data: dict):
    doc = yaml.safe_load((REPO / "deploy.yaml").read_text())
    doc["data"], doc["workdir"] = data, str(tmp_path / "work")
    return parse_deploy(doc, str(tmp_path / "deploy.yaml"), tmp_path)


# --- image folders ----------------------------------------------------------------------------------------------

def test_a_folder_with_train_and_test_is_decoded_prepared_and_cached(tmp_path, monkeypatch):
    folder(tmp_path / "photos")
    cfg = config(tmp_path, {"name": "folder", "path": "photos",
                            "preprocess": {"resize": [4, 4], "scale": "1/255", "mean": [0.5], "std": [0.25]}})
    d = load_data(cfg)
    assert d.classes == ("cat", "dog", "emu") and d.num_classes == 3
    assert d.x_train.shape == (12, 3, 4, 4) and d.x_test.shape == (12, 3, 4, 4) and d.x_train.dtype == np.float32
    assert sorted(d.y_train.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert d.preprocess == Preprocess(channels=3, resize=(4, 4), scale=1 / 255, mean=(0.5,), std=(0.25,))
    assert isinstance(d.x_train, np.memmap) and d.x_train.flags.writeable  # copy-on-write: torch may take it
    # the cached arrays are exactly the spec applied to what Pillow decodes
    i = int(np.flatnonzero(d.y_train == 1)[0])
    raw = [np.asarray(PIL.open(p).convert("RGB")) for p in sorted((tmp_path / "photos/train/dog").iterdir())]
    assert any(np.allclose(d.preprocess.apply(r), d.x_train[i]) for r in raw)
    # a second load decodes nothing
    from pipeline.data import folder as folder_mod

    monkeypatch.setattr(folder_mod, "decode", lambda *a: pytest.fail("decoded again"))
    again = load_data(cfg)
    assert np.array_equal(again.x_train, d.x_train) and np.array_equal(again.y_test, d.y_test)
    monkeypatch.undo()
    # a changed file is a miss; the superseded entry goes
    cache = tmp_path / "work" / "data"
    before = {p.name for p in cache.iterdir()}
    image(tmp_path / "photos/train/cat/0.png", seed=999)
    os.utime(tmp_path / "photos/train/cat/0.png", ns=(1, 1))
    load_data(cfg)
    after = {p.name for p in cache.iterdir()}
    assert len(after) == 1 and after != before


def test_a_folder_of_class_folders_is_split_by_seed(tmp_path):
    folder(tmp_path / "photos", per_class=5, split=False, size=(10, 7))
    cfg = config(tmp_path, {"name": "folder", "path": "photos", "channels": 1, "test_fraction": 0.4, "seed": 3,
                            "preprocess": {"resize": 6, "crop": [5, 5], "layout": "NHWC"}})
    d = load_data(cfg)
    assert d.x_train.shape == (9, 5, 5, 1) and d.x_test.shape == (6, 5, 5, 1)
    assert d.preprocess.channels == 1 and d.preprocess.scale == pytest.approx(1 / 255)  # the folder's default
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1
    other = load_dataset("folder", path=tmp_path / "photos", seed=4, channels=1, test_fraction=0.4,
                         preprocess=Preprocess(resize=6, crop=(5, 5), layout="NHWC"))  # in memory: no cache_dir
    assert not np.array_equal(other.y_test, d.y_test) or not np.array_equal(other.x_test, d.x_test)
    assert sorted(np.concatenate([d.y_train, d.y_test]).tolist()) == sorted(
        np.concatenate([other.y_train, other.y_test]).tolist())


def _corrupt(root):
    folder(root)
    (root / "train/dog/2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "test/emu/3.png").write_bytes(b"not an image")


def _truncated(root):
    folder(root)
    p = root / "train/cat/0.png"
    p.write_bytes(p.read_bytes()[:60])


def _empty_class(root):
    folder(root)
    (root / "train/fox").mkdir()
    (root / "train/fox/notes.txt").write_text("no images here")


def _sizes(root):
    folder(root)
    image(root / "train/emu/9.png", size=(7, 8))


def _aspect(root):
    folder(root)
    image(root / "train/emu/9.png", size=(12, 8))


@pytest.mark.parametrize("make, data, expected", [
    (_corrupt, {}, ["data.path", "2 image(s) cannot be used", "train/dog/2.png: cannot be decoded as an image",
                    "test/emu/3.png: cannot be decoded"]),
    (_truncated, {}, ["train/cat/0.png: cannot be decoded as an image"]),
    (_empty_class, {}, ["data.path", "class folder(s) without .png/.jpg images: train/fox"]),
    (_sizes, {}, ["train/emu/9.png: 7x8, but", "images of different sizes need data.preprocess.resize"]),
    (_aspect, {"preprocess": {"resize": 4}}, ["train/emu/9.png", "differ once prepared", "crop: [H, W]"]),
    (lambda root: root.mkdir(), {}, ["photos: has no class folders"]),
    (lambda root: folder(root / "train"), {}, ["has train/ but no test/"]),
    (lambda root: (folder(root), image(root / "test/yak/0.png")), {}, ["test/ has classes train/ lacks: yak"]),
    (lambda root: folder(root), {"preprocess": {"crop": [9, 9]}}, ["smaller than the crop 9x9"]),
    (lambda root: folder(root), {"train_size": 50}, ["data.train_size 50", "has 12 images"]),
    (lambda root: (root.parent.mkdir(exist_ok=True), root.write_text("x")), {}, ["photos: not a directory"]),
    (lambda root: None, {}, ["data.path:", "photos: no such file or directory"]),
])
def test_every_bad_folder_is_one_config_error_naming_the_file(tmp_path, make, data, expected):
    make(tmp_path / "photos")
    cfg = config(tmp_path, {"name": "folder", "path": "photos", **data})
    with pytest.raises(ConfigError) as err:
        load_data(cfg)
    text = str(err.value)
    assert text.startswith(str(tmp_path / "deploy.yaml")), text
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"
    assert not (tmp_path / "work" / "data").exists() or not any(
        p for p in (tmp_path / "work" / "data").iterdir() if not p.name.startswith(".")), "a failed entry was kept"


@pytest.mark.parametrize("data, expected", [
    ({"name": "folder"}, "data.path: required with data.name folder"),
    ({"name": "folder", "path": "p", "preprocess": {"resize": 0}}, "data.preprocess: resize: expected an integer"),
    ({"name": "folder", "path": "p", "preprocess": {"layout": "CHW"}}, "data.preprocess: layout: expected one of"),
    ({"name": "folder", "path": "p", "preprocess": [1]}, "data.preprocess: expected a mapping"),
    ({"name": "folder", "path": "p", "channels": 1, "preprocess": {"channels": 3}}, "disagree"),
    ({"name": "folder", "path": "p", "channels": 2}, "data.channels"),
    ({"name": "digits", "path": "p"}, "data.path: only read with data.name npz or folder"),
])
def test_a_bad_data_section_is_refused_by_the_config(tmp_path, data, expected):
    with pytest.raises(ConfigError, match="deploy.yaml") as err:
        config(tmp_path, data)
    assert expected in str(err.value)


def test_the_data_section_round_trips(tmp_path):
    cfg = config(tmp_path, {"name": "folder", "path": "p", "channels": 3,
                            "preprocess": {"resize": 8, "crop": 6, "scale": "1/255", "layout": "NHWC"}})
    again = type(cfg.data).model_validate(cfg.data.model_dump(mode="json"))
    assert again == cfg.data and again.spec() == cfg.data.spec() and again.spec().crop == (6, 6)


def test_a_built_in_set_can_be_prepared_for_a_colour_model(tmp_path):
    d = load_data(config(tmp_path, {"name": "digits", "channels": 3, "preprocess": {"resize": [16, 16]}}))
    assert d.input_shape == (3, 16, 16) and d.preprocess.channels == 3
    assert np.array_equal(d.x_train[:, 0], d.x_train[:, 2])


def test_a_data_model_shape_mismatch_names_both_shapes(tmp_path, monkeypatch, tiny_onnx):
    from pipeline.export.model_file import check_inputs, inspect_model_file

    folder(tmp_path / "photos", size=(12, 12))
    (tmp_path / "gray_net.py").write_text("from torch import nn\n\ndef net(input_shape, num_classes):\n"
                                          "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(tmp_path, {"name": "folder", "path": "photos"})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"zoo": None, "factory": "gray_net:net"})})
    data = load_data(cfg)
    with pytest.raises(ConfigError) as err:
        check_model(cfg, data)
    assert "(3, 12, 12)" in str(err.value) and "data.name 'folder'" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a model file the user brings: the same check, both shapes named
        check_inputs(inspect_model_file(tiny_onnx), data.input_shape, f"{cfg.source}: data (folder)")
    assert "samples of shape (3, 12, 12)" in str(err.value) and "1, 8, 8) (batch first)" in str(err.value)


# --- memory-mapped npz ------------------------------------------------------------------------------------------

def test_uncompressed_npz_members_are_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((20, 1, 6, 6), dtype=np.float32), "y_train": rng.integers(0, 3, 20),
              "x_test": np.asfortranarray(rng.random((5, 1, 6, 6), dtype=np.float32)), "y_test": np.arange(5) % 3}
    np.savez(tmp_path / "d.npz", **arrays)
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    stored, packed = open_npz(tmp_path / "d.npz"), open_npz(tmp_path / "z.npz")
    for k, v in arrays.items():
        assert isinstance(stored[k], np.memmap) and np.array_equal(stored[k], v)
        assert not isinstance(packed[k], np.memmap) and np.array_equal(packed[k], v)
    d = load_dataset("npz", path=tmp_path / "d.npz", train_size=10)
    assert d.x_train.shape == (10, 1, 6, 6) and isinstance(d.x_train.base, np.memmap)
    assert d.num_classes == 3 and d.y_train.dtype == np.int64 and d.preprocess is None


def test_npz_of_8_bit_images_is_prepared_once_into_the_cache(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "u8.npz", x_train=rng.integers(0, 256, (30, 3, 9, 9), dtype=np.uint8),
             y_train=np.arange(30) % 2, x_test=rng.integers(0, 256, (6, 3, 9, 9), dtype=np.uint8),
             y_test=np.arange(6) % 2)
    cfg = config(tmp_path, {"name": "npz", "path": "u8.npz", "preprocess": {"crop": 7, "scale": "1/255",
                                                                            "channel_order": "BGR"}})
    d = load_data(cfg)
    raw = np.load(tmp_path / "u8.npz")["x_test"]
    assert d.x_test.shape == (6, 3, 7, 7) and isinstance(d.x_test, np.memmap)
    assert np.allclose(d.x_test, raw[:, ::-1, 1:8, 1:8] / 255)
    assert d.preprocess == Preprocess(crop=(7, 7), scale=1 / 255, channel_order="BGR")
    assert len(list((tmp_path / "work" / "data").iterdir())) == 1


@pytest.mark.parametrize("arrays, expected", [
    ({"x_train": np.full((4, 1, 3, 3), np.nan)}, "x_train has NaN or infinite values (sample 0)"),
    ({"x_test": np.concatenate([np.zeros((3, 1, 3, 3)), np.full((1, 1, 3, 3), np.inf)]).astype(np.float32)},
     "x_test has NaN or infinite values (sample 3)"),
    ({"y_train": np.array([0, -1, 1, 0])}, "y_train has negative labels"),
    ({"y_train": np.array([0, 0.5, 1, 0])}, "y_train has values that are not whole numbers"),
    ({"x_train": np.array([["a"]] * 4)}, "x_train [4, 1] / y_train"),
    ({"x_test": np.array([[["a"]]] * 4)}, "x_test has dtype <U1; expected numbers"),
])
def test_bad_npz_contents_are_one_error(tmp_path, arrays, expected):
    base = {"x_train": np.zeros((4, 1, 3, 3), np.float32), "y_train": np.zeros(4), "x_test": np.zeros((4, 1, 3, 3)),
            "y_test": np.zeros(4, np.int64)}
    np.savez(tmp_path / "bad.npz", **{**base, **arrays})
    with pytest.raises(DataError) as err:
        load_dataset("npz", path=tmp_path / "bad.npz")
    assert "bad.npz" in str(err.value) and expected.replace("[4, 1]", "(4, 1)") in str(err.value)


def test_a_truncated_npz_is_one_error(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((50, 1, 8, 8), np.float32), y_train=np.zeros(50),
             x_test=np.zeros((5, 1, 8, 8)), y_test=np.zeros(5))
    raw = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.npz: cannot read as .npz"):
        load_dataset("npz", path=tmp_path / "cut.npz")


# --- the spec travels signed ------------------------------------------------------------------------------------

def test_the_artifact_manifest_carries_the_data_spec(tiny_onnx, tmp_path, key_dir):
    from pipeline.bundle import load_artifact

    spec = Preprocess(channels=1, resize=(8, 8), scale=1 / 255)
    art = make_artifact(tiny_onnx, tmp_path / "out", key_dir, 1, preprocess=spec)
    assert load_artifact(art.dir).manifest.preprocess == spec
    assert art.envelope["signed"]["preprocess"] == spec.to_dict()
    plain = make_artifact(tiny_onnx, tmp_path / "out", key_dir, 2)
    assert plain.manifest.preprocess is None and "preprocess" not in plain.envelope["signed"]
    names = tuple(f"class {i}" for i in range(10))
    named = make_artifact(tiny_onnx, tmp_path / "out", key_dir, 3, labels=names)
    assert load_artifact(named.dir).manifest.labels == names and named.envelope["signed"]["labels"] == list(names)
    with pytest.raises(ExportError, match=r"the device would refuse this manifest: manifest: 3 labels for an output "
                                          r"of shape \['batch', 10\]"):
        make_artifact(tiny_onnx, tmp_path / "out", key_dir, 4, labels=("a", "b", "c"))
