"""The "pruned but not faster" gate: when a recipe asked for fewer MACs, the runtime must show a speedup."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import BudgetError


def diagnose(model: nn.Module, mac_ratio: float, speedup: float, threads: int) -> list[str]:
    hints = []
    odd = [f"{n} ({m.out_channels})" for n, m in model.named_modules()
           if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels % 8]
    if odd:
        hints.append(f"channel counts that are not multiples of the CPU's vector width waste the cut: {odd[:6]}; "
                     "set round_to: 8 (or 16 for AVX-512) in the structured step")
    if threads > 1:
        hints.append(f"at {threads} threads small layers are dominated by synchronisation; the speedup at one "
                     "thread is usually closer to the MAC cut")
    hints.append("tiny layers are bound by per-op overhead, not arithmetic: prune the widest layers harder "
                 "(global_pruning: true) or fuse/remove layers")
    return hints


def speed_gate(dense: nn.Module, model: nn.Module, input_shape: tuple[int, ...], mac_ratio: float, threads: int,
               min_fraction: float, opset: int = 17) -> dict[str, Any]:
    """Measure onnxruntime speedup (interleaved rounds); raise BudgetError when it is below
    ``min_fraction`` of the MAC reduction."""
    from ..export import export_model
    from .compare import compare_latency

    with tempfile.TemporaryDirectory() as tmp:
        a = export_model("onnx", dense, input_shape, Path(tmp) / "dense.onnx", opset)
        b = export_model("onnx", model, input_shape, Path(tmp) / "pruned.onnx", opset)
        _, cmp = compare_latency([a, b], input_shape, threads=threads)  # rounds adapt to the models' latency
    result = {"mac_ratio": mac_ratio, "speedup": cmp["speedup"], "spread": cmp["speedup_spread"],
              "ci": cmp["speedup_ci"], "rounds": cmp["rounds"], "threads": threads,
              "required": round(min_fraction * mac_ratio, 3)}
    if cmp["speedup"] < min_fraction * mac_ratio:
        hints = diagnose(model, mac_ratio, cmp["speedup"], threads)
        raise BudgetError(
            f"the recipe cut MACs {mac_ratio:.2f}x but onnxruntime runs the pruned model only {cmp['speedup']:.2f}x "
            f"faster here ({threads} thread(s); required {min_fraction:.0%} of the cut). Likely causes:\n  - "
            + "\n  - ".join(hints), {"speed": result})
    return result


def speed_stage(compressed, threads: int, min_fraction: float, opset: int, ui, force: bool = False) -> dict | None:
    """The gate after a structured step that asked for fewer MACs (``macs_reduction``): None when none asked or
    the gate is off (``export.min_speedup_fraction: 0``); with ``force`` a miss is a warning."""
    if min_fraction <= 0 or not any((s.params or {}).get("macs_reduction") for s in compressed.steps):
        return None
    with ui.stage("Check that fewer MACs means faster (onnxruntime, interleaved rounds)"):
        try:
            speed = speed_gate(compressed.dense, compressed.model, compressed.data.input_shape,
                               compressed.summary["mac_ratio"], threads, min_fraction, opset)
        except BudgetError as exc:
            if not force:
                raise
            ui.warn(f"{exc}\n  deploying anyway (--force)")
            return None
        ui.info(f"{speed['mac_ratio']:.2f}x fewer MACs, {speed['speedup']:.2f}x faster (required "
                f"{speed['required']:.2f}x)")
        return speed
