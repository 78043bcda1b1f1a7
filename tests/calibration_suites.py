"""Tiny calibration suites built in code (the onnx helper API): what a host would ship, in milliseconds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_agent.calibration import SUITE_FILE, Case, Suite


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def conv(path: Path, cin: int, cout: int, hw: int, groups: int = 1, seed: int = 0) -> tuple[Path, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // groups, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups)
    shape = (1, cin, hw, hw)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])], [w])
    return _save(graph, path), shape


def gemm(path: Path, n: int, m: int, seed: int = 0) -> tuple[Path, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n, m)).astype(np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    shape = (1, n)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m])], [w])
    return _save(graph, path), shape


def relu(path: Path, shape: tuple[int, ...]) -> tuple[Path, tuple[int, ...]]:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return _save(graph, path), shape


def four_models(d: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """A first layer, a depthwise convolution, a pointwise one as a GEMM, an elementwise op."""
    d.mkdir(parents=True, exist_ok=True)
    return {"first": conv(d / "first.onnx", 3, 8, 16), "dw": conv(d / "dw.onnx", 8, 8, 16, groups=8),
            "gemm": gemm(d / "gemm.onnx", 64, 32), "relu": relu(d / "relu.onnx", (1, 8, 16, 16))}


def write_zip(path: Path, suite: Suite | bytes | None, files: dict[str, bytes | Path]) -> Path:
    """``files``: name in the zip -> bytes or a file to copy; ``suite``: written as suite.json when given."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if suite is not None:
            zf.writestr(SUITE_FILE, suite if isinstance(suite, bytes) else suite.to_json())
        for name, data in files.items():
            zf.writestr(name, data if isinstance(data, bytes) else Path(data).read_bytes())
    return path


def suite_zip(path: Path, models: dict[str, tuple[Path, tuple[int, ...]]], groups: dict[str, int],
              **settings) -> tuple[Path, Suite]:
    """A suite of ``models`` (id -> (file, shape)), each case in the group ``groups`` gives it."""
    cases = tuple(Case(cid, f.name, shape, groups.get(cid, 0)) for cid, (f, shape) in models.items())
    suite = Suite(name="test-suite", cases=cases, **settings)
    return write_zip(path, suite, {f.name: f for f, _ in models.values()}), suite
