"""Predicted figures for a target: a per-node roofline from the target's facts, and a power model.

Latency = session overhead + sum over nodes of (per-op overhead + cost factor x roofline time), where
the roofline time of a node is max(2 x MACs / peak, bytes moved / bandwidth). Three levels of
knowledge, best first:
1. the target carries op factors it was calibrated with (``efficiency.ops``: host.yaml, written by
   ``pipeline targets calibrate``): used as they are;
2. a calibrated host is known: its factors, relative to its convolution factor, transfer to the
   target (anchored at the target's own efficiency); per-op overhead stays the target's own;
3. otherwise the target's flat efficiency and per-op overhead.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..targets import OpFactor, TargetProfile
from .static import StaticProfile

_COMPUTE = {"conv", "conv_dw", "gemm"}


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


def op_factors(target: TargetProfile, host: TargetProfile | None, quantized: bool
               ) -> tuple[dict[str, OpFactor], OpFactor, float, str]:
    """(factors per category, factor for any other category, session overhead in seconds, provenance)."""
    eff = target.efficiency
    base = eff.int8 if quantized else eff.fp32
    flat = OpFactor(roofline_factor=1 / base, overhead_us=eff.per_op_overhead_us)
    if eff.ops:
        return dict(eff.ops), flat, eff.session_overhead_us * 1e-6, f"op factors calibrated on {target.name}"
    if host is not None and host.efficiency.ops and host.efficiency.ops.get("conv", OpFactor(roofline_factor=0,
                                                                                          overhead_us=0)).roofline_factor:
        # the host tells how each op category fares relative to convolution; the target's own efficiency
        # anchors convolution, and its own per-op overhead stands (dispatch cost is a property of the device)
        ref = host.efficiency.ops["conv"].roofline_factor
        factors = {c: OpFactor(roofline_factor=f.roofline_factor / ref / base, overhead_us=eff.per_op_overhead_us)
                   for c, f in host.efficiency.ops.items()}
        return factors, flat, eff.session_overhead_us * 1e-6, \
            f"host-calibrated relative op factors anchored at {target.name}'s efficiency {base:g}"
    return {}, flat, eff.session_overhead_us * 1e-6, f"flat efficiency {base:g}"


def predict(profile: StaticProfile, target: TargetProfile, host: TargetProfile | None = None) -> dict[str, Any]:
    """Latency, peak memory and energy per inference on ``target`` (batch 1, all cores)."""
    factors, default, session_s, how = op_factors(target, host, profile.quantized)
    total_s, per_category = session_s, {}
    for cat, (count, roof_s) in roofline_terms(profile, target).items():
        f = factors.get(cat, default)
        t = count * f.overhead_us * 1e-6 + roof_s * f.roofline_factor
        per_category[cat] = round(t * 1e3, 5)
        total_s += t
    latency_ms = total_s * 1e3
    resident = profile.peak_activation_bytes + (0 if target.memory.weights_in_flash else profile.weight_bytes)
    peak_memory_mb = target.runtime_overhead_mb + resident / 2**20
    energy_mj = latency_ms * target.power.active_w  # ms x W = mJ: the whole board while it infers
    compute_bound = sum(1 for n in profile.nodes if n.category in _COMPUTE)
    peak = target.cpu.peak_gops_int8 if profile.quantized else target.cpu.peak_gflops_fp32
    return {
        "latency_ms": round(latency_ms, 4),
        "peak_memory_mb": round(peak_memory_mb, 3),
        "energy_mj": round(energy_mj, 4),
        "latency_ms_by_category": per_category,
        "compute_nodes": compute_bound,
        "nodes": len(profile.nodes),
        "basis": f"roofline at {peak:g} G{'OP' if profile.quantized else 'FLOP'}/s and "
                 f"{target.memory.bandwidth_gbs:g} GB/s with {how}; energy at {target.power.active_w:g} W active",
    }
