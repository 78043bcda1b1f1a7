"""The golden check holds across kernel families (reference, fused integer kernels, another rounding) and
still refuses a model that computes something else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from device_agent.cpu import read_cpu_features
from device_agent.errors import HealthCheckError
from device_agent.health import check_golden, tolerances
from device_agent.manifest import Manifest, decode_tensor
from device_agent.runtimes import Session, TensorSpec
from device_agent.runtimes.onnxruntime_backend import Int8Semantics, OnnxRuntime
from pipeline.bundle.golden import golden_section, output_scales, shifted_model
from pipeline.export import export_model, ort_predict, quantize_model


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("health")
    x = np.random.default_rng(1).random((48, 1, 8, 8), dtype=np.float32)
    out = {}
    for seed in (0, 1):  # 1: the same architecture with other weights, i.e. a wrong model
        src = export_model("onnx", _cnn(seed), (1, 8, 8), tmp / f"m{seed}.onnx", 17)
        y = ort_predict(src, x).argmax(1)
        out[seed], _ = quantize_model("int8-static", src, tmp / f"q{seed}.onnx", x[:32], x, y, max_drop=1.0)
    return out[0], out[1], x[32:36], tmp


def _manifest(golden: dict) -> Manifest:
    return Manifest(name="m", version=1, target="rpi4", created="", expires=None, runtime="onnxruntime",
                    filename="model.onnx", length=0, sha256="", chunk_size=1, chunks=0, io={}, golden=golden,
                    health={}, budgets={}, predicted={})


class Offset(Session):
    """Another session's outputs moved by a fixed amount: a device that computes something slightly else."""

    def __init__(self, inner: Session, delta: float) -> None:
        self.inner, self.delta = inner, delta
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feeds):
        return [o + np.float32(self.delta) for o in self.inner.run(feeds)]


def test_a_quantized_golden_carries_a_tolerance_from_its_quantization(quantized):
    import onnx

    q, _, x, _ = quantized
    golden = golden_section(OnnxRuntime(), q, x)
    [scale] = output_scales(onnx.load(str(q)))
    [q_atol] = golden["quantized"]["atol"]
    assert golden["semantics"] == "reference" and golden["quantized"]["output_scales"] == [scale]
    assert scale <= q_atol <= 32 * scale  # one output step plus what one level off everywhere makes
    assert q_atol > golden["atol"]  # the float tolerance would refuse legitimate integer kernels
    assert tolerances(golden)[2] == [q_atol]


def test_every_kernel_family_passes(quantized, tmp_path):
    import onnx

    q, _, x, _ = quantized
    manifest = _manifest(golden_section(OnnxRuntime(), q, x))
    rt = OnnxRuntime()
    assert check_golden(rt.load(q), manifest) == len(x)  # whatever this CPU takes by default
    assert check_golden(rt.load(q, int8=Int8Semantics.REFERENCE), manifest) == len(x)
    if not read_cpu_features().u8s8_saturates:  # this CPU's fused integer kernels are exact (VNNI, ARM)
        assert check_golden(rt.load(q, int8=Int8Semantics.KERNELS), manifest) == len(x)
    # a kernel family that rounds differently: every requantization a third of a step off
    for step in (0.3, -0.3):
        other = tmp_path / f"rounding{step:+}.onnx"
        onnx.save(shifted_model(onnx.load(str(q)), step), str(other))
        assert check_golden(rt.load_reference(other), manifest) == len(x)


def test_a_wrong_quantized_model_is_refused(quantized):
    q, wrong, x, _ = quantized
    manifest = _manifest(golden_section(OnnxRuntime(), q, x))
    with pytest.raises(HealthCheckError, match=r"golden vectors do not match:\n  case 0 output 0: max abs diff"):
        check_golden(OnnxRuntime().load(wrong), manifest)
    # outputs a few output steps off everywhere (what a saturating kernel does) fail, even with the classes kept
    [q_atol] = manifest.golden["quantized"]["atol"]
    with pytest.raises(HealthCheckError, match=r"predicted classes agree"):
        check_golden(Offset(OnnxRuntime().load(q), 1.5 * q_atol), manifest)
    assert check_golden(Offset(OnnxRuntime().load(q), 0.5 * q_atol), manifest) == len(x)


def test_a_float_model_keeps_the_strict_tolerance(quantized, tiny_onnx):
    _, _, x, _ = quantized
    golden = golden_section(OnnxRuntime(), tiny_onnx, x)
    assert "quantized" not in golden
    manifest = _manifest(golden)
    session = OnnxRuntime().load(tiny_onnx)
    assert check_golden(session, manifest) == len(x)
    expected = decode_tensor(golden["cases"][0]["outputs"][0], "golden")
    with pytest.raises(HealthCheckError, match="max abs diff"):
        check_golden(Offset(session, 10 * golden["atol"] + 1e-3 * float(np.abs(expected).max())), manifest)


def test_a_malformed_quantized_section_falls_back_to_the_float_tolerance():
    assert tolerances({"atol": 0.5, "quantized": "junk"}) == (0.5, 1e-3, [])
    assert tolerances({"quantized": {"atol": ["x", 2]}}) == (1e-4, 1e-3, [0.0, 2.0])


def test_a_session_with_the_wrong_shape_is_reported():
    class Wrong(Session):
        inputs = [TensorSpec("input", (1, 1, 8, 8), "float32")]
        outputs = [TensorSpec("logits", (1, 3), "float32")]

        def run(self, feeds):
            return [np.zeros((1, 3), np.float32)]

    from device_agent.manifest import encode_tensor

    golden = {"cases": [{"inputs": {"input": encode_tensor(np.zeros((1, 1, 8, 8), np.float32))},
                         "outputs": [encode_tensor(np.zeros((1, 10), np.float32))]}], "atol": 1e-4}
    with pytest.raises(HealthCheckError, match=r"shape \(1, 3\), expected \(1, 10\)"):
        check_golden(Wrong(), _manifest(golden))
