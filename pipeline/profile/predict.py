"""Predicted figures for a target: a per-node roofline from the target's facts, and a power model."""

from __future__ import annotations

from typing import Any

from ..targets import TargetProfile
from .static import StaticProfile


def predict(profile: StaticProfile, target: TargetProfile) -> dict[str, Any]:
    """Latency, peak memory and energy per inference on ``target`` (batch 1, all cores)."""
    eff = target.efficiency
    peak = target.cpu.peak_gops_int8 if profile.quantized else target.cpu.peak_gflops_fp32
    compute_rate = peak * 1e9 * (eff.int8 if profile.quantized else eff.fp32)  # ops per second
    bandwidth = target.memory.bandwidth_gbs * 1e9
    total_s, compute_bound = 0.0, 0
    for node in profile.nodes:
        t_compute = 2 * node.macs / compute_rate
        t_memory = (node.weight_bytes + node.activation_bytes) / bandwidth
        compute_bound += t_compute >= t_memory and node.macs > 0
        total_s += max(t_compute, t_memory) + eff.per_op_overhead_us * 1e-6
    latency_ms = total_s * 1e3
    resident = profile.peak_activation_bytes + (0 if target.memory.weights_in_flash else profile.weight_bytes)
    peak_memory_mb = target.runtime_overhead_mb + resident / 2**20
    energy_mj = latency_ms * target.power.active_w  # ms x W = mJ: the whole board while it infers
    return {
        "latency_ms": round(latency_ms, 4),
        "peak_memory_mb": round(peak_memory_mb, 3),
        "energy_mj": round(energy_mj, 4),
        "compute_bound_nodes": compute_bound,
        "nodes": len(profile.nodes),
        "basis": f"roofline: {peak:g} G{'OP' if profile.quantized else 'FLOP'}/s x efficiency, "
                 f"{target.memory.bandwidth_gbs:g} GB/s, {eff.per_op_overhead_us:g} us/op; "
                 f"energy at {target.power.active_w:g} W active",
    }
