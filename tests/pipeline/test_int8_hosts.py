"""int8 figures that do not depend on the host's CPU: the same gate with and without VNNI (this machine
may have it; EDGEFLEET_CPU_FLAGS forces the path of one that does not)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from device_agent.cpu import FLAGS_ENV, parse_cpuinfo, read_cpu_features
from device_agent.errors import RuntimeBackendError
from device_agent.runtimes.onnxruntime_backend import Int8Semantics, OnnxRuntime, integer_ops
from pipeline.export import export_model, ort_predict, quantize_model
from pipeline.export.parity import sqnr_db

AVX2_ONLY = "fpu sse4_1 sse4_2 avx avx2 fma"  # an EPYC Rome-class x86: no AVX-512, no VNNI
VNNI = AVX2_ONLY + " avx512f avx512bw avx512_vnni"
X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\nflags\t\t: {}\n\nprocessor\t: 1\n"
ARM_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
               "CPU part\t: 0xd08\n\nprocessor\t: 1\n")
FUSED = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
         "QLinearAdd", "DynamicQuantizeMatMul"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A conv net and its int8-static QDQ model, on inputs whose ranges make U8S8 pair sums large."""
    tmp = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    src = export_model("onnx", cnn, (1, 8, 8), tmp / "m.onnx", 17)
    y = ort_predict(src, x).argmax(1)
    dst, _ = quantize_model("int8-static", src, tmp / "q.onnx", x[:32], x, y, max_drop=1.0)
    return src, dst, x, y


def test_cpu_features_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86_CPUINFO.format(AVX2_ONLY))
    rome = read_cpu_features(path, env={}, arch="x86_64")
    assert rome.model_name == "AMD EPYC 7B12" and rome.u8s8_saturates and rome.int8_dot == "avx2-vpmaddubsw"
    path.write_text(X86_CPUINFO.format(VNNI))
    assert not read_cpu_features(path, env={}, arch="x86_64").u8s8_saturates
    path.write_text(ARM_CPUINFO)
    a72 = read_cpu_features(path, env={}, arch="aarch64")
    assert a72.model_name == "ARM CPU part 0xd08" and not a72.u8s8_saturates and a72.int8_dot == "arm-neon"
    assert a72.to_dict()["flags"]["asimd"] and not a72.to_dict()["flags"]["asimddp"]
    forced = read_cpu_features(path, env={FLAGS_ENV: "avx2, fma"}, arch="x86_64")
    assert forced.u8s8_saturates and forced.source == f"${FLAGS_ENV}"
    assert parse_cpuinfo("") == ("", frozenset())
    assert read_cpu_features(tmp_path / "absent", env={}).flags == frozenset()


def _optimized_ops(path, int8, tmp_path):
    import onnx

    from device_agent.runtimes.onnxruntime_backend import session_options
    import onnxruntime as ort

    opts = session_options(None, int8)
    opts.optimized_model_filepath = str(tmp_path / f"optimized-{int8.value}.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def test_reference_semantics_runs_the_qdq_graph_as_written(models, tmp_path):
    _, dst, _, _ = models
    reference = _optimized_ops(dst, Int8Semantics.REFERENCE, tmp_path)
    assert not reference & FUSED, reference  # no integer kernel left to saturate
    assert {"DequantizeLinear", "QuantizeLinear", "Conv", "Gemm"} <= reference
    assert _optimized_ops(dst, Int8Semantics.KERNELS, tmp_path) & FUSED  # what onnxruntime does otherwise


@pytest.mark.parametrize("flags", [AVX2_ONLY, VNNI])
def test_the_gate_is_the_same_with_and_without_vnni(models, monkeypatch, flags):
    src, dst, x, y = models
    from pipeline.export import quantization_report

    monkeypatch.delenv(FLAGS_ENV, raising=False)
    native = quantization_report("int8-static", src, dst, x, y, max_drop=1.0)
    monkeypatch.setenv(FLAGS_ENV, flags)
    forced = quantization_report("int8-static", src, dst, x, y, max_drop=1.0)
    assert forced["semantics"] == "reference" and forced["host_kernels"]["u8s8_saturates"] == (flags == AVX2_ONLY)
    for key in ("accuracy_quantized", "accuracy_fp32"):
        assert forced[key] == native[key]
    assert forced["sqnr_db"] == pytest.approx(native["sqnr_db"], abs=0.05)
    assert forced["sqnr_db"] > 20 and forced["accuracy_quantized"] >= 0.9


def test_an_agent_on_x86_without_vnni_computes_what_the_target_computes(models, monkeypatch, tmp_path):
    _, dst, x, _ = models
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    session = OnnxRuntime().load(dst)
    assert session.int8_semantics is Int8Semantics.REFERENCE
    monkeypatch.setenv(FLAGS_ENV, VNNI)
    assert OnnxRuntime().load(dst).int8_semantics is Int8Semantics.KERNELS
    arm = tmp_path / "cpuinfo"
    arm.write_text(ARM_CPUINFO)
    assert OnnxRuntime().load(dst, cpu=read_cpu_features(arm, env={}, arch="aarch64")).int8_semantics \
        is Int8Semantics.KERNELS
    name = session.inputs[0].name
    got = np.concatenate([session.run({name: x[i:i + 1]})[0] for i in range(len(x))])
    assert np.allclose(got, ort_predict(dst, x), atol=1e-6)  # the gate's numbers, on any host


def test_an_agent_refuses_integer_kernels_that_would_saturate(models, monkeypatch, tmp_path):
    src, _, x, y = models
    dyn, _ = quantize_model("int8-dynamic", src, tmp_path / "dyn.onnx", x[:8], x, y, max_drop=1.0)
    assert integer_ops(dyn)
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    with pytest.raises(RuntimeBackendError, match="saturate on this CPU.*int8-static"):
        OnnxRuntime().load(dyn)
    monkeypatch.setenv(FLAGS_ENV, VNNI)
    assert OnnxRuntime().load(dyn).int8_semantics is Int8Semantics.KERNELS


def test_dynamic_int8_is_judged_as_float_arithmetic_on_its_integers(models, monkeypatch, tmp_path):
    """quantize_dynamic writes ConvInteger/MatMulInteger into the graph: the gate and the golden vectors run
    its float twin, which is what exact int32 kernels compute, on any host."""
    from device_agent.health import check_golden
    from pipeline.bundle import golden_section
    from pipeline.export import quantization_report
    from pipeline.export.reference import reference_file

    src, _, x, y = models
    exact_kernels = not read_cpu_features().u8s8_saturates  # this host's (VNNI, ARM)
    dyn, native = quantize_model("int8-dynamic", src, tmp_path / "dyn.onnx", x[:8], x, y, max_drop=1.0)
    assert native["semantics"] == "reference-float-twin"
    with reference_file(dyn) as twin:
        assert twin != dyn and not integer_ops(twin)
        exact = ort_predict(twin, x)
    if exact_kernels:  # the twin computes what exact integer kernels do
        assert np.allclose(ort_predict(dyn, x, int8=Int8Semantics.KERNELS), exact, atol=1e-5)
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    forced = quantization_report("int8-dynamic", src, dyn, x, y, max_drop=1.0)
    assert (forced["accuracy_quantized"], forced["sqnr_db"]) == (native["accuracy_quantized"], native["sqnr_db"])
    golden = golden_section(OnnxRuntime(), dyn, x[:3])  # built on a (forced) saturating host all the same
    if not exact_kernels:
        return
    monkeypatch.setenv(FLAGS_ENV, VNNI)
    from device_agent.manifest import Manifest

    manifest = Manifest(name="m", version=1, target="rpi4", created="", expires=None, runtime="onnxruntime",
                        filename="dyn.onnx", length=0, sha256="", chunk_size=1, chunks=0, io={}, golden=golden,
                        health={}, budgets={}, predicted={})
    assert check_golden(OnnxRuntime().load(dyn), manifest) == 3  # a device with exact integer kernels agrees


def test_the_profile_report_records_the_host_cpu(models, monkeypatch):
    from pipeline.profile import profile_model
    from pipeline.targets import load_target

    _, dst, _, _ = models
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    host = profile_model(dst, load_target("rpi4"), runs=3).to_dict()["host"]
    assert host["arch"] and host["model_name"] and host["source"] == f"${FLAGS_ENV}"
    assert host["flags"]["avx2"] and not host["flags"]["avx512_vnni"] and host["u8s8_saturates"]
    assert set(host["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "asimddp", "neon"}
    monkeypatch.delenv(FLAGS_ENV)
    assert profile_model(dst, load_target("rpi4"), runs=3).to_dict()["host"]["source"] == "/proc/cpuinfo"


QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")


@pytest.mark.slow
def test_on_an_emulated_avx2_only_cpu_kernels_saturate_and_the_reference_does_not(models, tmp_path):
    """onnxruntime picks its kernels by CPUID: under qemu-user with a Haswell CPU (AVX2, no VNNI) the fused
    U8S8 kernels saturate; the reference semantics give this host's numbers bit for bit."""
    from conftest import require

    require(QEMU is not None and sys.platform == "linux", "qemu-x86_64 (apt-get install qemu-user-static)")
    src, dst, x, y = models
    np.save(tmp_path / "x.npy", x)
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        import numpy as np
        from device_agent.runtimes.onnxruntime_backend import Int8Semantics, OnnxRuntime
        x = np.load({str(tmp_path / 'x.npy')!r})
        for int8 in (Int8Semantics.KERNELS, Int8Semantics.REFERENCE):
            s = OnnxRuntime().load({str(dst)!r}, int8=int8)
            np.save({str(tmp_path)!r} + f"/{{int8.value}}.npy", s.run({{s.inputs[0].name: x}})[0])
    """))
    proc = subprocess.run([QEMU, "-cpu", "Haswell-v4", sys.executable, str(probe)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2]),
                                            "PATH": "/usr/bin:/bin"})
    require(not (proc.returncode != 0 and "Illegal instruction" in proc.stderr),
            "a qemu-x86_64 that emulates AVX2 (qemu >= 7.2)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fp32 = ort_predict(src, x)
    reference = ort_predict(dst, x)
    emulated_reference = np.load(tmp_path / "reference.npy")
    emulated_kernels = np.load(tmp_path / "kernels.npy")
    assert np.array_equal(emulated_reference, reference)  # the gate's figures, on the other kind of CPU
    assert sqnr_db(fp32, emulated_kernels) < sqnr_db(fp32, reference) - 10  # what the gate would have measured
    assert (emulated_kernels.argmax(1) == y).mean() < (reference.argmax(1) == y).mean()
