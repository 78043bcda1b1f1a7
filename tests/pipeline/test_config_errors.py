"""Every bad deploy.yaml, and every bad file it names, is exit 2 with one message naming the file and the field.

Driven through the CLI's own entry point (in-process `main`, one case as a subprocess) as a user meets it.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main

from conftest import REPO


@pytest.fixture
def base():
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["data"] = {"name": "digits"}  # 8x8, loads in milliseconds
    return data


def deploy(capsys, path: Path, *args: str) -> tuple[int, str]:
    rc = main(["deploy", "--config", str(path), "--target", "rpi4", *args])
    captured = capsys.readouterr()
    return rc, " ".join((captured.err + captured.out).split())  # rich wraps long lines


def write(tmp_path: Path, data, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_error(rc: int, out: str, path: Path, *expected: str) -> None:
    assert rc == 2, out
    assert "Traceback" not in out
    assert out.count("error:") == 1, out
    assert str(path.name) in out, out
    for text in expected:
        assert text in out, f"{text!r} not in {out!r}"


#: 10 lines that expand to 10**7 values: each level lists the previous one ten times
ALIAS_BOMB = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 10)}]\n".encode() for c in "bcdefg")


# --- the file itself --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe\x00\x01version: 1\n\x89PNG", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"version: 1\nmodel: {zoo: small-cnn}\n\x00\x01", "not valid YAML"),
    (b"- a\n- b\n", "expected a mapping at the top level"),
    (b"", "expected a mapping at the top level"),
    (b"just a string", "expected a mapping at the top level"),
    (b"version: 2024-13-01\n", "not valid YAML"),  # PyYAML raises ValueError for such a date
    (b"version: 1\nmodel: " + b"[" * 200 + b"]" * 200, "nested deeper than"),
    (ALIAS_BOMB, "more than 100,000 values"),
    (b"version: true\nmodel: {zoo: small-cnn}\n", "version: got True"),
    (b"version: 1\nmodel: {zoo: small-cnn}\nsource: elsewhere.yaml\n", "source: unknown key"),
])
def test_a_file_that_is_not_a_deployment(tmp_path, capsys, content, expected):
    path = tmp_path / "deploy.yaml"
    path.write_bytes(content)
    assert_one_error(*deploy(capsys, path), path, expected)


def test_missing_oversized_and_directory_configs(tmp_path, capsys):
    rc, out = deploy(capsys, tmp_path / "nope.yaml")
    assert_one_error(rc, out, tmp_path / "nope.yaml", "cannot read")
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n" + "# padding\n" * 120_000)
    assert_one_error(*deploy(capsys, big), big, "larger than 1024 KiB")
    (tmp_path / "dir.yaml").mkdir()
    assert_one_error(*deploy(capsys, tmp_path / "dir.yaml"), tmp_path / "dir.yaml", "cannot read")


# --- names deploy.yaml uses -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(targets={"rpi44": {"budgets": {"latency_ms": 5}}}),
     ["targets.rpi44: unknown device class 'rpi44'", "known device classes: ", "rpi4, rpi5"]),
    (lambda d: d["fleet"].update(devices=[{"id": "pi-1", "target": "rpi-4"}]),
     ["fleet.devices.0.target: unknown device class 'rpi-4'", "rpi4"]),
    (lambda d: d["model"].update(zoo="nope-net"), ["model.zoo: got 'nope-net'; known: ds-cnn, lenet5, mobilenetv2, mobilenetv2-small"]),
    (lambda d: d.update(data={"name": "cifar"}), ["data.name: got 'cifar'; known: digits, mnist-5k, npz"]),
    (lambda d: d.update(data={"name": "npz"}), ["data.path: required with data.name npz"]),
    (lambda d: d.update(data={"name": "digits", "path": "x.npz"}), ["data.path: only read with data.name npz"]),
    (lambda d: d["model"].update(zoo=None, factory="not a factory"), ["must look like 'package.module:function'"]),
    # several problems at once: one message, one line each
    (lambda d: (d.update(targets={"rpi44": {}}, data={"name": "cifar"}), d["model"].update(zoo="x")),
     ["invalid configuration", "targets.rpi44", "data.name: got 'cifar'", "model.zoo: got 'x'"]),
])
def test_unknown_names_list_the_known_ones(tmp_path, capsys, base, change, expected):
    change(base)
    path = write(tmp_path, base)
    assert_one_error(*deploy(capsys, path), path, *expected)


@pytest.mark.parametrize("command", [["compress", "--out", "out"], ["fit", "--target", "rpi4"], ["history"],
                                     ["rollback", "--target", "rpi4"], ["fleet", "status"]])
def test_every_command_that_reads_deploy_yaml_refuses_it_alike(tmp_path, capsys, base, command):
    base["targets"] = {"rpi44": {}}
    path = write(tmp_path, base)
    rc = main([*command, "--config", str(path)])
    out = " ".join(capsys.readouterr().err.split())
    assert_one_error(rc, out, path, "targets.rpi44: unknown device class 'rpi44'")


def test_a_deploy_yaml_of_its_own_targets_adds_classes(tmp_path, capsys, base):
    from pipeline.config import load_deploy

    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "my-board.yaml").write_text((REPO / "targets" / "rpi4.yaml").read_text())
    base["targets"] = {"my-board": {"budgets": {"latency_ms": 5}}, "rpi4": {}}
    assert set(load_deploy(write(tmp_path, base)).targets) == {"my-board", "rpi4"}


# --- files deploy.yaml names ------------------------------------------------------------------------------------

def small_cnn_state(path: Path, zoo: str = "small-cnn", shape=(1, 8, 8)) -> Path:
    from pipeline.models import MODELS

    torch.save(MODELS.get(zoo)(shape, 10).state_dict(), path)
    return path


def make_files(tmp_path: Path) -> None:
    small_cnn_state(tmp_path / "lenet.pt", "lenet5", (1, 28, 28))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_text("not a checkpoint at all")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + bytes(60))
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((4, 1, 8, 8)))
    np.savez(tmp_path / "flat.npz", x_train=np.zeros((4, 64)), y_train=np.zeros(4), x_test=np.zeros((2, 64)),
             y_test=np.zeros(2))
    np.savez(tmp_path / "strings.npz", x_train=np.array([["a"]]), y_train=np.array([0]), x_test=np.array([["b"]]),
             y_test=np.array([0]))
    np.savez(tmp_path / "tiny.npz", x_train=np.zeros((4, 1, 2, 2)), y_train=np.zeros(4), x_test=np.zeros((4, 1, 2, 2)),
             y_test=np.zeros(4))
    np.savez(tmp_path / "nan.npz", x_train=np.full((4, 1, 8, 8), np.nan), y_train=np.zeros(4),
             x_test=np.zeros((4, 1, 8, 8)), y_test=np.zeros(4))
    np.savez(tmp_path / "empty.npz", x_train=np.zeros((0, 1, 8, 8)), y_train=np.zeros(0),
             x_test=np.zeros((4, 1, 8, 8)), y_test=np.zeros(4))


@pytest.mark.parametrize("model, data, expected", [
    ({"checkpoint": "missing.pt"}, None, ["model.checkpoint:", "missing.pt: no such file", "torch.save"]),
    ({"checkpoint": "."}, None, ["model.checkpoint:", "a directory, not a file"]),
    ({"checkpoint": "garbage.pt"}, None, ["model.checkpoint:", "garbage.pt: not a PyTorch checkpoint"]),
    ({"checkpoint": "tensor.pt"}, None, ["model.checkpoint:", "holds a Tensor, not a state_dict"]),
    ({"checkpoint": "list.pt"}, None, ["model.checkpoint:", "not a state_dict of tensors"]),
    ({"checkpoint": "lenet.pt"}, None, ["model.checkpoint:", "lenet.pt does not fit model.zoo 'small-cnn'",
                                        "in the file", "in the model"]),
    ({"options": {"widths": [-4]}}, None, ["model.zoo 'small-cnn' with options", "widths"]),
    (None, {"name": "digits", "train_size": 5000}, ["data: dataset 'digits' has 1797 samples; train_size 5000"]),
    (None, {"name": "npz", "path": "missing.npz"}, ["data.path:", "missing.npz: no such file"]),
    (None, {"name": "npz", "path": "corrupt.npz"}, ["data.path", "corrupt.npz", "cannot"]),
    (None, {"name": "npz", "path": "text.npz"}, ["data.path", "text.npz", "cannot"]),
    (None, {"name": "npz", "path": "partial.npz"}, ["data.path", "partial.npz", "expected x_train, y_train"]),
    (None, {"name": "npz", "path": "flat.npz"}, ["data.path", "flat.npz", "(N, C, H, W)"]),
    (None, {"name": "npz", "path": "strings.npz"}, ["data.path", "strings.npz"]),
    (None, {"name": "npz", "path": "nan.npz"}, ["data.path", "nan.npz: x_train has NaN"]),
    (None, {"name": "npz", "path": "empty.npz"}, ["data.path", "empty.npz: cannot be read"]),
    (None, {"name": "npz", "path": "tiny.npz"}, ["model.zoo 'small-cnn'", "cannot run on the images",
                                                 "(1, 2, 2)"]),
])
def test_files_the_config_names(tmp_path, capsys, base, model, data, expected):
    make_files(tmp_path)
    base["model"].update(model or {})
    if data:
        base["data"] = data
    path = write(tmp_path, base)
    assert_one_error(*deploy(capsys, path), path, *expected)


FACTORIES = '''
from torch import nn


def wrong_input(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
def wrong_output(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
def raises(input_shape, num_classes):
    raise RuntimeError("no GPU here")
def not_a_module(input_shape, num_classes):
    return 42
VALUE = 3
'''


@pytest.mark.parametrize("attr, expected", [
    ("wrong_input", ["cannot run on the images of data.name 'digits'", "(1, 8, 8)"]),
    ("wrong_output", ["returns (1, 3) for one image; expected (1, 10)"]),
    ("raises", ["building the model failed (RuntimeError: no GPU here)"]),
    ("not_a_module", ["returned int, expected torch.nn.Module"]),
    ("VALUE", ["has a non-callable int 'VALUE'; its callables: not_a_module, raises, wrong_input, wrong_output"]),
    ("nothing", ["has no 'nothing'; its callables: not_a_module, raises"]),
])
def test_a_factory_that_does_not_make_a_usable_model(tmp_path, capsys, base, monkeypatch, attr, expected):
    module = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    base["model"] = {"factory": f"{module}:{attr}"}
    path = write(tmp_path, base)
    assert_one_error(*deploy(capsys, path), path, f"model.factory '{module}:{attr}'", *expected)


def test_a_factory_module_that_cannot_be_imported(tmp_path, capsys, base, monkeypatch):
    (tmp_path / "broken_models.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base["model"] = {"factory": "nowhere.models:make"}
    path = write(tmp_path, base)
    assert_one_error(*deploy(capsys, path), path, "model.factory 'nowhere.models:make'", "no module named 'nowhere'",
                     "PYTHONPATH")
    base["model"] = {"factory": "broken_models:make"}
    path = write(tmp_path, base)
    assert_one_error(*deploy(capsys, path), path, "importing broken_models failed",
                     "needs 'not_installed_anywhere'")


def test_a_good_checkpoint_and_factory_pass_the_checks(tmp_path, base):
    """The checks refuse only what is wrong: a fitting checkpoint and a working factory go through."""
    from pipeline.compress.stage import prepare
    from pipeline.config import load_deploy
    from pipeline.ui import UI

    state = small_cnn_state(tmp_path / "good.pt")
    base["model"]["checkpoint"] = "good.pt"
    prepared = prepare(load_deploy(write(tmp_path, base)).view_compress(), UI(quiet=True))
    assert prepared.origin["source"] == "checkpoint"
    expected = torch.load(state, weights_only=True)
    assert all(torch.equal(prepared.model.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("change, expected", [
    (lambda d, t: d.update(workdir="state"), ["workdir:", "state is a file, not a directory"]),
    (lambda d, t: d.update(signing={"key_dir": "state/keys"}), ["signing.key_dir:", "cannot be created",
                                                                "state is not a directory"]),
    (lambda d, t: d["fleet"].update(broker={"host": "127.0.0.1", "ca_file": "ca.pem", "cert_file": "host.crt",
                                            "key_file": "host.key"}),
     ["invalid configuration", "fleet.broker.ca_file:", "ca.pem: no such file", "fleet.broker.key_file:",
      "pipeline broker config"]),
    (lambda d, t: (t.joinpath("ca.pem").write_text("not a certificate"),
                   d["fleet"].update(broker={"host": "127.0.0.1", "ca_file": "ca.pem"})),
     ["fleet.broker.ca_file:", "not a PEM CA certificate"]),
])
def test_fleet_files_and_directories_are_checked_before_any_work(tmp_path, capsys, base, change, expected):
    (tmp_path / "state").write_text("a file where a directory should be")
    change(base, tmp_path)
    path = write(tmp_path, base)
    rc, out = deploy(capsys, path)
    assert_one_error(rc, out, path, *expected)
    assert "Compress" not in out  # refused before compression starts


def test_the_files_pipeline_broker_config_writes_pass(tmp_path):
    from pipeline.config import load_deploy
    from pipeline.inputs import check_fleet_files
    from pipeline.broker.config import write_broker_config

    made = write_broker_config(tmp_path / "broker", ["pi-1"], 8883, "edgefleet", None)
    data = yaml.safe_load((REPO / "deploy.yaml").read_text())
    data["fleet"]["broker"] = {"host": "127.0.0.1", "port": 8883, "ca_file": str(made["ca"]),
                               "cert_file": str(made["host"].cert), "key_file": str(made["host"].key)}
    check_fleet_files(load_deploy(write(tmp_path, data)))


def test_the_real_entry_point_prints_no_traceback(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", "--config", str(path), "--target", "rpi4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "deploy.yaml: not UTF-8 text (byte 0x89 at offset 0)" in proc.stderr.replace("\n", " ")


def test_no_model_is_built_for_a_refused_config(tmp_path, capsys, base, monkeypatch):
    """A refused name stops before any stage: nothing is trained, nothing lands in the workdir."""
    base["targets"] = {"rpi-4": {}}
    path = write(tmp_path, base)
    assert_one_error(*deploy(capsys, path), path, "targets.rpi-4")
    assert not (tmp_path / ".edgefleet").exists()

