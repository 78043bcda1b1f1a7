"""The machine a profile was measured on: architecture, CPU model and the features int8 speed and
correctness depend on (AVX2, AVX-512, VNNI; NEON, dot product). An int8 figure measured on this host
means little without them: onnxruntime's U8S8 kernels saturate on x86 without VNNI."""

from __future__ import annotations

import os
import platform
from typing import Any

from device_agent.cpu import read_cpu_features


def host_cpu() -> dict[str, Any]:
    """This host's CPU as the profile report records it (``EDGEFLEET_CPU_FLAGS`` overrides the flags and
    says so in ``source``)."""
    return {**read_cpu_features().to_dict(), "cores": os.cpu_count() or 1, "python": platform.python_version()}
