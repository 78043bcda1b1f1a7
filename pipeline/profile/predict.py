"""Predicted figures for a target: a per-node roofline from the target's facts, and a power model.

The roofline time of a node is max(2 x MACs / peak, bytes moved / bandwidth). Three levels of knowledge, best
first; the prediction's ``basis`` says which one answered:
1. the target carries op factors it was calibrated with (``efficiency.ops``: host.yaml, written by
   ``pipeline targets calibrate``): latency = session overhead + per category (nodes x overhead + factor x
   roofline time), the factors used as they are;
2. a calibrated host is known: its factors, relative to its convolution factor, transfer to the target
   (anchored at the target's own dense efficiency); per-op overhead stays the target's own;
3. otherwise roofline only, uncalibrated: each node against the target's own ceilings (see
   :class:`pipeline.targets.Efficiency`): a compute ceiling per kernel class (dense convolution and GEMM at
   ``fp32``/``int8`` of peak, shortened reductions such as first layers and grouped convolutions at
   K / (K + ``reduction_overhead_macs``) of that, depthwise at ``depthwise`` of it) and the measured memory
   bandwidth, plus the per-op overhead; activations fused into their producer, Q/DQ nodes absorbed into int8
   kernels (whose bytes are then int8) and nodes no runtime runs cost nothing.
A calibration made before a category existed is read through the category it was split from (``PARENT``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..targets import OpFactor, TargetProfile
from .static import NodeCost, StaticProfile

_COMPUTE = {"conv", "conv_first", "conv_dw", "conv_group", "gemm"}
#: kernels lowered to a GEMM (im2col, indirect or direct): their reduction length sets their share of peak
_GEMM_LOWERED = {"conv", "conv_first", "conv_group", "gemm"}
#: never run as kernels of their own: folded into the producer, or removed when the runtime loads the model
_FREE = {"fused", "qdq_fused", "folded"}
#: categories split from an older one: a calibration that predates them has the older one's factor
PARENT = {"conv_first": "conv", "conv_group": "conv", "fused": "elementwise", "qdq_fused": "qdq",
          "folded": "other"}


def roofline_terms(profile: StaticProfile, target: TargetProfile) -> dict[str, tuple[int, float]]:
    """Per op category: (node count, roofline seconds at 100% of the target's peak)."""
    peak = (target.cpu.peak_gops_int8 if profile.quantized else target.cpu.peak_gflops_fp32) * 1e9
    bandwidth = target.memory.bandwidth_gbs * 1e9
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for node in profile.nodes:
        t = max(2 * node.macs / peak, (node.weight_bytes + node.activation_bytes) / bandwidth)
        out[node.category][0] += 1
        out[node.category][1] += t
    return {k: (int(v[0]), v[1]) for k, v in out.items()}


def compute_share(node: NodeCost, target: TargetProfile, quantized: bool) -> float:
    """The share of the target's peak this node's kernel reaches, from the target's own facts."""
    eff = target.efficiency
    share = eff.int8 if quantized else eff.fp32
    if node.category == "conv_dw":
        return share * eff.depthwise
    if node.category in _GEMM_LOWERED and node.reduction:
        return share * node.reduction / (node.reduction + eff.reduction_overhead_macs)
    return share


def uncalibrated_seconds(node: NodeCost, target: TargetProfile, quantized: bool) -> float:
    """One node, roofline only: its compute at its kernel class's ceiling, or its bytes at the measured bandwidth,
    whichever is longer, plus the per-op overhead."""
    if node.category in _FREE:
        return 0.0
    peak = (target.cpu.peak_gops_int8 if quantized else target.cpu.peak_gflops_fp32) * 1e9
    compute = 2 * node.macs / (peak * compute_share(node, target, quantized)) if node.macs else 0.0
    moved = node.run_bytes if node.run_bytes is not None else node.weight_bytes + node.activation_bytes
    memory = moved / (target.memory.bandwidth_gbs * 1e9)
    return max(compute, memory) + target.efficiency.per_op_overhead_us * 1e-6


def op_factors(target: TargetProfile, host: TargetProfile | None, quantized: bool
               ) -> tuple[dict[str, OpFactor], str] | None:
    """Calibrated factors per category and their provenance (levels 1 and 2), or None (level 3)."""
    eff = target.efficiency
    base = eff.int8 if quantized else eff.fp32
    if eff.ops:
        return dict(eff.ops), f"calibrated: op factors fitted on {target.name}"
    if host is not None and host.efficiency.ops and host.efficiency.ops.get("conv", OpFactor(roofline_factor=0,
                                                                                          overhead_us=0)).roofline_factor:
        # the host tells how each op category fares relative to convolution; the target's own efficiency
        # anchors convolution, and its own per-op overhead stands (dispatch cost is a property of the device)
        ref = host.efficiency.ops["conv"].roofline_factor
        factors = {c: OpFactor(roofline_factor=f.roofline_factor / ref / base, overhead_us=eff.per_op_overhead_us)
                   for c, f in host.efficiency.ops.items()}
        return factors, (f"calibrated on host, transferred: host-calibrated relative op factors anchored at "
                         f"{target.name}'s efficiency {base:g}")
    return None


def _calibrated(profile: StaticProfile, target: TargetProfile, factors: dict[str, OpFactor]) -> dict[str, float]:
    eff = target.efficiency
    flat = OpFactor(roofline_factor=1 / (eff.int8 if profile.quantized else eff.fp32),
                    overhead_us=eff.per_op_overhead_us)
    out = {}
    for cat, (count, roof_s) in roofline_terms(profile, target).items():
        f = factors.get(cat, factors.get(PARENT.get(cat, cat), flat))
        out[cat] = count * f.overhead_us * 1e-6 + roof_s * f.roofline_factor
    return out


def _uncalibrated(profile: StaticProfile, target: TargetProfile) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for node in profile.nodes:
        out[node.category] += uncalibrated_seconds(node, target, profile.quantized)
    return dict(out)


def predict_memory_mb(profile: StaticProfile, target: TargetProfile) -> float:
    """The agent's RSS with the model loaded and run (``Memory``'s model). A microcontroller (weights in flash)
    holds its activations' arena beside the runtime, and nothing else."""
    mem = target.memory
    if mem.weights_in_flash:
        return target.runtime_overhead_mb + profile.peak_activation_bytes / 2**20
    copies = mem.weight_copies_int8 if profile.quantized else mem.weight_copies_fp32
    other = max(profile.weight_bytes - profile.matmul_weight_bytes, 0)
    return (target.runtime_overhead_mb + mem.agent_mb + mem.session_mb
            + (copies * other + mem.weight_copies_matmul * profile.matmul_weight_bytes
               + mem.activation_factor * profile.peak_activation_bytes) / 2**20)


def predict(profile: StaticProfile, target: TargetProfile, host: TargetProfile | None = None) -> dict[str, Any]:
    """Latency, peak memory and energy per inference on ``target`` (batch 1, all cores)."""
    eff = target.efficiency
    calibrated = op_factors(target, host, profile.quantized)
    if calibrated is not None:
        seconds, how = _calibrated(profile, target, calibrated[0]), calibrated[1]
    else:
        seconds = _uncalibrated(profile, target)
        dense = eff.int8 if profile.quantized else eff.fp32
        how = (f"roofline only, uncalibrated: {target.name}'s own efficiencies (dense {dense:g} of peak, depthwise "
               f"x{eff.depthwise:g}, reduction overhead {eff.reduction_overhead_macs:g} MACs per output, "
               f"{eff.per_op_overhead_us:g} us per op)")
    total_s = eff.session_overhead_us * 1e-6 + sum(seconds.values())
    latency_ms = total_s * 1e3
    peak_memory_mb = predict_memory_mb(profile, target)
    energy_mj = latency_ms * target.power.active_w  # ms x W = mJ: the whole board while it infers
    compute_bound = sum(1 for n in profile.nodes if n.category in _COMPUTE)
    peak = target.cpu.peak_gops_int8 if profile.quantized else target.cpu.peak_gflops_fp32
    return {
        "latency_ms": round(latency_ms, 4),
        "peak_memory_mb": round(peak_memory_mb, 3),
        "energy_mj": round(energy_mj, 4),
        "latency_ms_by_category": {c: round(s * 1e3, 5) for c, s in seconds.items()},
        "compute_nodes": compute_bound,
        "nodes": len(profile.nodes),
        "calibrated": calibrated is not None,
        "basis": f"{how}; roofline at {peak:g} G{'OP' if profile.quantized else 'FLOP'}/s and "
                 f"{target.memory.bandwidth_gbs:g} GB/s; energy at {target.power.active_w:g} W active",
    }
