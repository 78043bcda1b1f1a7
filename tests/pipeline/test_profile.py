import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Budgets
from pipeline.export import export_model
from pipeline.profile import analyse, predict, profile_model
from pipeline.profile.budgets import evaluate, failures
from pipeline.targets import load_target


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    with torch.no_grad():
        m[3].weight[:, :128] = 0  # half of the linear layer pruned
    return export_model("onnx", m, (1, 8, 8), tmp_path_factory.mktemp("p") / "m.onnx", 17)


def test_static_counts_match_hand_computation(model_path):
    s = analyse(model_path)
    conv_macs = 4 * 8 * 8 * (1 * 3 * 3)
    linear_macs = 10 * 256
    assert s.macs == conv_macs + linear_macs
    assert s.params == 4 * 9 + 4 + 256 * 10 + 10
    assert s.nonzero_params == s.params - 128 * 10
    # the largest live set: the conv output (4x8x8 floats) and the ReLU output it feeds
    assert s.peak_activation_bytes >= 2 * 4 * 8 * 8 * 4
    assert not s.quantized and s.size_bytes == model_path.stat().st_size


def test_prediction_scales_with_work(model_path):
    rpi4 = load_target("rpi4")
    s = analyse(model_path)
    base = predict(s, rpi4)
    for n in s.nodes:
        n.macs *= 10_000  # compute-bound now: the roofline must follow the MACs
    heavier = predict(s, rpi4)
    assert heavier["latency_ms"] > base["latency_ms"] * 10
    assert heavier["energy_mj"] == pytest.approx(heavier["latency_ms"] * rpi4.power.active_w, rel=1e-3)
    assert base["peak_memory_mb"] > rpi4.runtime_overhead_mb


def test_budget_table_margins_and_failures():
    rows = evaluate(Budgets(latency_ms=10, model_size_mb=1), {"latency_ms": (12.0, "predicted"),
                                                              "model_size_mb": (0.25, "file"),
                                                              "energy_mj": (5.0, "predicted")})
    by = {r.name: r for r in rows}
    assert set(by) == {"latency_ms", "model_size_mb"}  # unset budgets are not checked
    assert not by["latency_ms"].passed and by["latency_ms"].margin == pytest.approx(-0.2)
    assert by["model_size_mb"].passed and by["model_size_mb"].margin == pytest.approx(0.75)
    assert failures(rows) == ["latency_ms: 12 ms (predicted) > limit 10 ms"]
    assert by["latency_ms"].to_dict()["pass"] is False


def test_profile_measures_in_a_clean_process(model_path):
    report = profile_model(model_path, load_target("rpi4"), runs=20)
    m = report.measured
    assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"] and m["runs"] == 20 and m["emulated"] is True
    assert m["rss_mb"] < 300  # onnxruntime and numpy only: torch is not in that process
    d = report.to_dict()
    assert {b["name"] for b in d["budgets"]} == {"latency_ms", "peak_memory_mb", "model_size_mb", "energy_mj"}


def test_speed_gate_refuses_pruning_that_does_not_run_faster():
    from pipeline.errors import BudgetError
    from pipeline.profile.speed import speed_gate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 64, 10)).eval()
    # the "pruned" model is the same network: claiming a 4x MAC cut, it cannot be 2x faster
    with pytest.raises(BudgetError, match=r"cut MACs 4.00x but onnxruntime runs the pruned model only") as err:
        speed_gate(model, model, (1, 8, 8), mac_ratio=4.0, threads=1, min_fraction=0.5)
    assert "round_to" in str(err.value) and "0 (12)" in str(err.value)
    result = speed_gate(model, model, (1, 8, 8), mac_ratio=1.0, threads=1, min_fraction=0.5)
    assert result["required"] == 0.5 and 0.5 < result["speedup"] < 2


def test_bad_model_files_get_clear_errors(tmp_path, model_path):
    import onnx

    from pipeline.errors import ModelError

    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ModelError, match="neither an ONNX model nor a TFLite flatbuffer|not an ONNX model"):
        analyse(junk)
    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    with pytest.raises(ModelError, match="not a readable TFLite model"):
        analyse(tfl)
    model = onnx.load(str(model_path))
    model.graph.node[1].op_type = "FluxCapacitor"
    odd = tmp_path / "odd.onnx"
    onnx.save(model, str(odd))
    with pytest.raises(ModelError, match=r"unknown operator\(s\) \['FluxCapacitor"):
        analyse(odd)
    with pytest.raises(ModelError, match="no such model file"):
        analyse(tmp_path / "missing.onnx")


def test_kernels_of_a_residual_int8_network(tmp_path):
    from pipeline.export import quantize_model
    from pipeline.models import zoo
    from pipeline.profile.kernels import kernels_of, qdq_kilo_elements

    torch.manual_seed(0)
    model = zoo.resnet_small((1, 8, 8), 10, widths=(8, 16, 32), blocks=1).eval()
    fp32 = export_model("onnx", model, (1, 8, 8), tmp_path / "r.onnx", 17)
    kinds = [k.kind for k in kernels_of(fp32)]
    # stem, 3 blocks x 2 convs, 2 projection shortcuts; 3 residual adds; global pool; classifier
    assert kinds.count("conv") == 1 + 6 + 2 and kinds.count("add") == 3
    assert kinds.count("gpool") == 1 and kinds.count("gemm") == 1
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    q, _ = quantize_model("int8-static", fp32, tmp_path / "q.onnx", x, x[:1], np.zeros(1, np.int64), 1.0)
    kq = kernels_of(q)
    assert [k.kind for k in kq] == kinds and all(k.int8 for k in kq)
    assert qdq_kilo_elements(q) > 0 and qdq_kilo_elements(fp32) == 0
    first = kq[0]
    assert (first.cin, first.cout, first.k, first.h) == (1, 8, 3, 8)


def test_tflite_static_profile_matches_the_onnx_one(model_path, tmp_path, tflite):
    from pipeline.profile.static import analyse

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    onnx_path = export_model("onnx", m, (1, 8, 8), tmp_path / "m.onnx", 17)
    tfl = export_model("tflite", m, (1, 8, 8), tmp_path / "m.tflite", 0)
    a, b = analyse(onnx_path), analyse(tfl)
    assert b.macs == a.macs == 4 * 8 * 8 * 9 + 10 * 256
    assert b.params == a.params and not b.quantized
    report = profile_model(tfl, load_target("rpi4"), runs=10)
    assert report.measured["latency_ms_p50"] > 0 and report.predicted["latency_ms"] > 0


@pytest.fixture(scope="module")
def kernel_classes_path(tmp_path_factory):
    """One convolution of each class: a first layer (3 channels), a grouped one (4 groups of 4), a depthwise
    one, a dense 1x1, each followed by a ReLU."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(64 * 16 * 16, 10)).eval()
    return export_model("onnx", m, (3, 16, 16), tmp_path_factory.mktemp("k") / "k.onnx", 17)


def test_convolutions_are_priced_by_kernel_class(kernel_classes_path):
    from pipeline.profile.predict import compute_share

    s = analyse(kernel_classes_path)
    convs = [n for n in s.nodes if n.op == "Conv"]
    assert [n.category for n in convs] == ["conv_first", "conv_group", "conv_dw", "conv"]
    assert [n.reduction for n in convs] == [3 * 9, 4 * 9, 9, 32]
    assert [n.category for n in s.nodes if n.op == "Relu"] == ["fused"] * 4
    rpi4 = load_target("rpi4")
    eff = rpi4.efficiency
    k0 = eff.reduction_overhead_macs
    assert k0 > 0 and eff.depthwise < 1
    shares = [compute_share(n, rpi4, quantized=False) for n in convs]
    assert shares == pytest.approx([eff.fp32 * 27 / (27 + k0), eff.fp32 * 36 / (36 + k0), eff.fp32 * eff.depthwise,
                                    eff.fp32 * 32 / (32 + k0)])
    p = predict(s, rpi4)
    assert p["basis"].startswith("roofline only, uncalibrated") and p["calibrated"] is False
    assert {"conv_first", "conv_group", "conv_dw", "conv", "fused"} <= set(p["latency_ms_by_category"])
    assert p["latency_ms_by_category"]["fused"] == 0
    assert p["latency_ms"] == pytest.approx(sum(p["latency_ms_by_category"].values()), abs=1e-3)


def test_a_calibration_made_before_a_category_existed_prices_it_as_its_parent(kernel_classes_path):
    """host.yaml fitted conv, conv_dw and elementwise only: a first layer and a grouped convolution cost as conv
    (a depthwise factor fitted near zero must not make grouped convolutions free), a fused ReLU as elementwise, on the host (level 1) and transferred to rpi4 (level 2)."""
    from pipeline.profile.predict import roofline_terms
    from pipeline.targets import Efficiency, OpFactor

    s = analyse(kernel_classes_path)
    rpi4 = load_target("rpi4")
    ops = {"conv": OpFactor(roofline_factor=2.0, overhead_us=1.0), "conv_dw": OpFactor(roofline_factor=5.0,
           overhead_us=3.0), "elementwise": OpFactor(roofline_factor=0.5, overhead_us=0.25),
           "gemm": OpFactor(roofline_factor=1.0, overhead_us=0.0)}
    host = rpi4.model_copy(update={"name": "host", "efficiency": Efficiency(fp32=0.5, int8=0.5, per_op_overhead_us=1,
                                                                             ops=ops)})
    terms = roofline_terms(s, host)
    p = predict(s, host)
    assert p["calibrated"] and p["basis"].startswith("calibrated: op factors fitted on host")
    by = p["latency_ms_by_category"]
    for cat, parent in (("conv_first", "conv"), ("conv_group", "conv"), ("fused", "elementwise")):
        n, roof = terms[cat]
        assert by[cat] == pytest.approx((n * ops[parent].overhead_us * 1e-6 + roof * ops[parent].roofline_factor) * 1e3,
                                        rel=1e-3), cat
    moved = predict(s, rpi4, host)
    assert moved["calibrated"] and moved["basis"].startswith("calibrated on host, transferred")
    n, roof = roofline_terms(s, rpi4)["conv_group"]
    expect = n * rpi4.efficiency.per_op_overhead_us * 1e-6 + roof * 2.0 / 2.0 / rpi4.efficiency.fp32
    assert moved["latency_ms_by_category"]["conv_group"] == pytest.approx(expect * 1e3, rel=1e-3)


def test_an_int8_graph_is_priced_as_an_int8_runtime_runs_it(kernel_classes_path, tmp_path):
    """QDQ: weight DQs and the Q/DQ pairs between int8 kernels are absorbed (qdq_fused, free uncalibrated); the
    input's Q and the output's DQ stay; the convolutions move int8 tensors and int8 weights."""
    from pipeline.export import quantize_model

    x = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    q, _ = quantize_model("int8-static", kernel_classes_path, tmp_path / "q.onnx", x, x[:1], np.zeros(1, np.int64), 1.0)
    s = analyse(q)
    assert s.quantized
    kept = [n for n in s.nodes if n.category == "qdq"]
    assert [n.op for n in kept] == ["QuantizeLinear", "DequantizeLinear"]
    assert {n.op for n in s.nodes if n.category == "qdq_fused"} == {"QuantizeLinear", "DequantizeLinear"}
    fp32 = {n.name: n for n in analyse(kernel_classes_path).nodes if n.op == "Conv"}
    for conv in (n for n in s.nodes if n.op == "Conv"):
        assert conv.run_bytes is not None and conv.run_bytes < conv.weight_bytes + conv.activation_bytes
    int8_moved = sum(n.run_bytes for n in s.nodes if n.op == "Conv")
    fp32_moved = sum(n.weight_bytes + n.activation_bytes for n in fp32.values())
    assert int8_moved == pytest.approx(fp32_moved / 4, rel=0.1)  # int8 where fp32 was 4 bytes (bias stays int32)
    by = predict(s, load_target("rpi4"))["latency_ms_by_category"]
    assert by["qdq_fused"] == 0 and by["qdq"] > 0


def test_architecture_names_compare_by_what_they_are():
    from pipeline.targets import normal_arch

    assert normal_arch("arm64") == normal_arch("aarch64") == "aarch64"
    assert normal_arch("AMD64") == normal_arch("x86_64") == "x86_64"
    assert normal_arch("xtensa") == "xtensa" and normal_arch("aarch64") != normal_arch("x86_64")


def test_kernels_of_squeeze_excitation_hardswish_grouped_and_ghost_layers(tmp_path):
    """What a MobileNetV3 / GhostNet block runs as kernels: the grouped 1x1 as a dense convolution of 4 groups,
    Hardswish as an elementwise kernel (no runtime fuses it), the SE gate's Hardsigmoid fused into its 1x1
    convolution and its scale as a broadcast product, the ghost concat, and a ReLU after a residual add fused."""
    from pipeline.profile.kernels import Kernel, kernels_of

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(8, 32, 1, groups=4, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                                      nn.Hardsigmoid())
            self.project = nn.Conv2d(32, 4, 1)
            self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x):
            y = self.dw(self.expand(x))
            y = self.project(y * self.gate(y))
            return torch.relu(x + torch.cat([y, self.cheap(y)], 1))

    path = export_model("onnx", Block().eval(), (8, 10, 10), tmp_path / "b.onnx", 17)
    ks = kernels_of(path)
    assert Kernel("conv", False, 8, 32, 1, 1, 10, 10, groups=4) in ks
    assert [k.op for k in ks if k.kind == "eltwise"] == ["hardswish", "bcast", "concat"]
    assert sum(k.kind == "dwconv" for k in ks) == 2 and sum(k.kind == "conv" for k in ks) == 4
    assert [k.kind for k in ks].count("gpool") == 1 and [k.kind for k in ks].count("add") == 1
    bcast = next(k for k in ks if k.op == "bcast")
    assert (bcast.cin, bcast.h, bcast.w) == (32, 10, 10)
