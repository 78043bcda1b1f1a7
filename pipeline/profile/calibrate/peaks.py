"""A device's facts and peak rates. The rates come from three cases of the calibration suite, timed on the device
like every other case: a large convolution (fp32, and its int8 QDQ version: the compute peaks) and a ReLU over
32 MiB (memory bandwidth, read + write). This host's CPU model and clock come from the OS."""

from __future__ import annotations

import platform
from pathlib import Path

import psutil

#: the peak convolution: 128 -> 256 channels, 3x3, at 28x28
PEAK_SHAPE = (128, 28, 28)
PEAK_MACS = 256 * 128 * 9 * 28 * 28
#: the bandwidth case: a ReLU over this many float32 elements (32 MiB; beyond the caches of the devices we know)
BANDWIDTH_SHAPE = (8, 1024, 1024)
BANDWIDTH_ELEMENTS = 8 * 1024 * 1024


def cpu_clock_ghz() -> float:
    freq = psutil.cpu_freq()
    if freq and (freq.max or freq.current):
        return round((freq.max or freq.current) / 1000, 3)
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.lower().startswith("cpu mhz")]
        return round(max(mhz) / 1000, 3)
    except (OSError, ValueError):
        return 1.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_modules():
    """(case id, module, input shape without the batch, int8?) of the three peak cases."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1)).eval()
    return [("peak-fp32", conv, PEAK_SHAPE, False), ("peak-int8", conv, PEAK_SHAPE, True),
            ("bandwidth", nn.ReLU().eval(), BANDWIDTH_SHAPE, False)]


def rates(ms: dict[str, float]) -> dict[str, float]:
    """The peak rates from the three cases' latencies (ms): fp32 GFLOP/s, int8 GOP/s, copy GB/s."""
    out = {}
    for key, case in (("gflops_fp32", "peak-fp32"), ("gops_int8", "peak-int8")):
        if ms.get(case):
            out[key] = round(2 * PEAK_MACS / (ms[case] * 1e-3) / 1e9, 2)
    if ms.get("bandwidth"):
        out["bandwidth_gbs"] = round(2 * 4 * BANDWIDTH_ELEMENTS / (ms["bandwidth"] * 1e-3) / 1e9, 2)
    return out
