import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import ExportError
from pipeline.export import check_parity, export_model, ort_predict, quantize_model
from pipeline.export.parity import sqnr_db


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)


def test_export_matches_pytorch(cnn, x, tmp_path):
    path = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    y = cnn(torch.from_numpy(x)).argmax(1).numpy()
    report = check_parity(cnn, path, x, y, atol=1e-4)
    assert report["max_abs_diff"] < 1e-4 and report["accuracy_onnx"] == report["accuracy_torch"] == 1.0
    import onnx

    assert onnx.load(str(path)).opset_import[0].version == 17


def test_parity_failure_lists_the_output(cnn, x, tmp_path):
    path = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    changed = nn.Sequential(*cnn).eval()
    with torch.no_grad():
        changed[3].bias.add_(0.5)
    with pytest.raises(ExportError, match=r"output 0 \(logits\): max abs diff 0.5"):
        check_parity(changed, path, x, np.zeros(len(x), dtype=np.int64), atol=1e-4)
    with torch.no_grad():
        changed[3].bias.sub_(0.5)


def test_int8_static_is_smaller_and_close(cnn, x, tmp_path):
    src = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    y = ort_predict(src, x).argmax(1)
    dst, report = quantize_model("int8-static", src, tmp_path / "q.onnx", x[:32], x, y, max_drop=0.1)
    assert report["sqnr_db"] > 20 and report["accuracy_quantized"] >= 0.9
    assert report["size_quantized_bytes"] < report["size_fp32_bytes"]
    # the gate ran the QDQ graph as written (the same on any host); this host's fused kernels are noted beside it
    assert report["semantics"] == "reference"
    assert set(report["host_kernels"]) >= {"cpu", "int8_dot", "u8s8_saturates", "sqnr_db", "accuracy"}
    import onnx

    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_quantization_drop_over_limit_is_refused(cnn, x, tmp_path):
    src = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    wrong_labels = (ort_predict(src, x).argmax(1) + 1) % 10  # fp32 accuracy 0 -> any drop is impossible...
    _, report = quantize_model("int8-static", src, tmp_path / "q.onnx", x[:32], x, wrong_labels, max_drop=0.0)
    assert report["accuracy_fp32"] == 0.0
    y = ort_predict(src, x).argmax(1)
    garbage_calibration = np.full((4, 1, 8, 8), 1000.0, dtype=np.float32)  # ranges far too wide
    with pytest.raises(ExportError, match="accuracy fell .* more than export.max_accuracy_drop"):
        quantize_model("int8-static", src, tmp_path / "q2.onnx", garbage_calibration, x, y, max_drop=0.0)


def test_sqnr():
    a = np.ones(100)
    assert sqnr_db(a, a) == float("inf")
    assert sqnr_db(a, a * 1.1) == pytest.approx(20.0)


@pytest.mark.parametrize("kind, min_ratio", [("int8-dynamic", 2.0), ("fp16", 1.8)])
def test_other_quantizers_shrink_and_stay_close(cnn, x, tmp_path, kind, min_ratio):
    src = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    y = ort_predict(src, x).argmax(1)
    dst, report = quantize_model(kind, src, tmp_path / f"{kind}.onnx", x[:16], x, y, max_drop=0.1)
    assert report["size_fp32_bytes"] / report["size_quantized_bytes"] > min_ratio
    assert report["sqnr_db"] > (20 if kind == "int8-dynamic" else 40)
    assert report["accuracy_quantized"] >= 0.9


def test_simplified_model_keeps_parity(cnn, x, tmp_path):
    from pipeline.export import simplify

    src = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    slim = simplify(src, tmp_path / "slim.onnx")
    y = cnn(torch.from_numpy(x)).argmax(1).numpy()
    assert check_parity(cnn, slim, x, y, atol=1e-4)["max_abs_diff"] < 1e-4


def test_tflite_fp32_and_full_integer_int8(cnn, x, tmp_path, tflite):
    from pipeline.export import quantization_report
    from pipeline.export.tflite_backend import export_tflite_int8

    from device_agent.runtimes import get_runtime

    fp32 = export_model("tflite", cnn, (1, 8, 8), tmp_path / "m.tflite", 0)
    y = cnn(torch.from_numpy(x)).argmax(1).numpy()
    parity = check_parity(cnn, fp32, x, y, atol=1e-4)
    assert parity["max_abs_diff"] < 1e-4 and parity["accuracy_onnx"] == 1.0
    int8 = export_tflite_int8(cnn, (1, 8, 8), tmp_path / "q.tflite", x[:32])
    report = quantization_report("int8", fp32, int8, x, y, max_drop=0.1)
    assert report["sqnr_db"] > 15 and report["accuracy_quantized"] >= 0.9
    assert report["size_fp32_bytes"] / report["size_quantized_bytes"] > 2
    session = get_runtime("tflite").load(int8)
    assert session._in[0]["dtype"] == np.int8  # full integer: the interpreter takes int8
    assert session.run({session.inputs[0].name: x[:1]})[0].dtype == np.float32  # the session speaks float


def test_minify_keeps_io_and_outputs(cnn, x, tmp_path):
    import onnx

    from pipeline.export import minify

    src = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.onnx", 17)
    before = ort_predict(src, x)
    size = src.stat().st_size
    minify(src)
    g = onnx.load(str(src)).graph
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["logits"]
    assert all(not n.name for n in g.node) and not g.value_info
    assert np.array_equal(ort_predict(src, x), before) and src.stat().st_size < size


def test_int8_convolutions_lose_their_zero_points_and_nothing_else(tmp_path):
    """Symmetric int8 weights and int32 biases need no zero-point tensors: dropped, the file is smaller, its outputs
    are bit-identical and onnxruntime fuses exactly the same integer kernels (a Gemm keeps its zero points: its
    fusion needs them)."""
    import collections

    import onnx
    import onnxruntime as ort

    from pipeline.export import QUANTIZERS
    from pipeline.export.onnx_files import drop_zero_points

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 24, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    images = np.random.default_rng(2).random((16, 3, 12, 12), dtype=np.float32)
    src = export_model("onnx", model, (3, 12, 12), tmp_path / "m.onnx", 17)
    full = QUANTIZERS.get("int8-static")(src, tmp_path / "q.onnx", images)
    stripped = onnx.load(str(full))
    stripped.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused_by_any_node"))
    assert drop_zero_points(stripped) == 6  # three convolutions: weights and biases
    assert "unused_by_any_node" in {t.name for t in stripped.graph.initializer}  # only zero points go
    onnx.save(stripped, str(tmp_path / "s.onnx"))
    assert (tmp_path / "s.onnx").stat().st_size < full.stat().st_size

    def fused(path):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        kernels = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
        return session.run(None, {"input": images})[0], kernels

    (y_full, k_full), (y_stripped, k_stripped) = fused(full), fused(tmp_path / "s.onnx")
    assert np.array_equal(y_full, y_stripped)
    assert k_full == k_stripped and k_full["QLinearConv"] == 3 and k_full["QGemm"] == 1
    assert ort_predict(tmp_path / "s.onnx", images).shape == (16, 10)


class _TwoHeads(nn.Module):
    """Two outputs: the parity check compares each by name."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.cls, self.box = nn.Linear(16, 10), nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        return self.cls(h), self.box(h)


def test_parity_compares_every_output_and_lists_every_mismatch(x, tmp_path):
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    path = export_model("onnx", model, (1, 8, 8), tmp_path / "two.onnx", 17)
    y = model(torch.from_numpy(x))[0].argmax(1).numpy()
    report = check_parity(model, path, x, y, atol=1e-4)
    names = list(report["outputs"])  # the file's output names; ONNX names the unnamed second one
    assert len(names) == 2 and names[0] == "logits"
    assert report["max_abs_diff"] == max(report["outputs"].values()) < 1e-4
    with torch.no_grad():
        model.cls.bias.add_(0.5)
        model.box.bias.add_(0.25)
    with pytest.raises(ExportError) as err:
        check_parity(model, path, x, y, atol=1e-4)
    lines = str(err.value).splitlines()
    assert lines[0] == "two.onnx does not match the PyTorch model:"
    assert lines[1].startswith("  output 0 (logits): max abs diff 0.5") and lines[2].startswith("  output 1 (")
    assert "max abs diff 0.25" in lines[2] and len(lines) == 3


def test_parity_refuses_a_different_number_of_outputs(cnn, x, tmp_path):
    torch.manual_seed(0)
    path = export_model("onnx", cnn, (1, 8, 8), tmp_path / "one.onnx", 17)
    with pytest.raises(ExportError, match=r"outputs: one.onnx has 1 \(logits\), the PyTorch model 2"):
        check_parity(_TwoHeads().eval(), path, x, np.zeros(len(x), dtype=np.int64), atol=1e-4)


def test_backends_declare_the_facts_of_the_formats_table():
    from pipeline.export import FORMATS, get_backend
    from pipeline.export.quantize import QUANTIZERS

    for name, fmt in FORMATS.items():
        b = get_backend(name)
        assert (b.name, b.suffix, b.runtime, b.quantizations, b.default_atol) == \
               (fmt.name, fmt.suffix, fmt.runtime, fmt.quantizations, fmt.default_atol)
        assert b.quantizations[0] == "none"
    assert set(QUANTIZERS.names()) == set(FORMATS["onnx"].quantizations)  # the ONNX quantizer registry
    from device_agent.runtimes import BY_SUFFIX, known_runtimes

    assert {f.suffix: f.runtime for f in FORMATS.values()} == BY_SUFFIX  # the agent reads what we write
    assert {f.runtime for f in FORMATS.values()} <= set(known_runtimes())


def test_unknown_format_lists_the_known_ones():
    from pipeline.export import get_backend
    from pipeline.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown export format 'coreml'; known: onnx, tflite"):
        get_backend("coreml")


def test_format_of_a_file_by_content(cnn, tmp_path):
    from pipeline.export import format_of_file

    path = export_model("onnx", cnn, (1, 8, 8), tmp_path / "m.bin", 17)
    assert format_of_file(path).name == "onnx"
    tfl = tmp_path / "m.onnx"
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    assert format_of_file(tfl).name == "tflite"


def test_the_formats_table_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; import pipeline.export, pipeline.export.formats, pipeline.export.backend; "
            "from pipeline.export import FORMATS, all_quantizations; assert all_quantizations(); "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'litert_torch', 'ai_edge_litert') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
