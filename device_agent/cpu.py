"""What this CPU can do for int8 inference, read from ``/proc/cpuinfo`` (no third-party imports).

The figure that matters: onnxruntime's x86 U8S8 int8 kernels (uint8 activations x int8 weights, what
a QDQ model from ``quantize_static`` runs on) use ``vpmaddubsw`` on CPUs without VNNI, which adds
pairs of products into *saturating* int16 lanes: the outputs are wrong, not just noisy. With AVX-512
VNNI or AVX-VNNI (``vpdpbusd``, int32 accumulation) and on ARM (widening multiply-accumulate,
``sdot``/``udot``) the integer arithmetic is exact.

``EDGEFLEET_CPU_FLAGS`` (space- or comma-separated) replaces the flags read from ``/proc/cpuinfo``,
so a test (or an emulated CPU under qemu-user, which passes the host's cpuinfo through) can take the
path of a CPU this machine is not: ``EDGEFLEET_CPU_FLAGS="avx2 fma"`` is an AVX2-only x86.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLAGS_ENV = "EDGEFLEET_CPU_FLAGS"
#: the flags int8 inference depends on (x86: vector width, dot-product instructions; ARM: NEON, dot, i8mm)
RELEVANT_FLAGS = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
                  "neon", "asimd", "asimddp", "i8mm", "sve")
#: x86 flags whose presence means U8S8 products accumulate in int32 (no int16 saturation)
X86_INT8_DOT = ("avx512_vnni", "avx_vnni")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_MAX_CPUINFO = 256 * 1024  # one processor block is a few KB; never read a many-core file whole


@dataclass(frozen=True)
class CpuFeatures:
    arch: str
    model_name: str
    flags: frozenset[str]
    source: str = "/proc/cpuinfo"

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in _X86

    @property
    def int8_dot(self) -> str:
        """The instruction family a U8S8 int8 GEMM runs on here."""
        if self.is_x86:
            if any(f in self.flags for f in X86_INT8_DOT):
                return "vnni"
            return "avx2-vpmaddubsw" if "avx2" in self.flags else "sse"
        if "asimddp" in self.flags:
            return "arm-dotprod"
        return "arm-neon" if {"asimd", "neon"} & self.flags else "generic"

    @property
    def u8s8_saturates(self) -> bool:
        """Whether onnxruntime's U8S8 integer kernels may saturate (int16 pair sums): x86 without VNNI."""
        return self.is_x86 and not any(f in self.flags for f in X86_INT8_DOT)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "model_name": self.model_name,
                "flags": {f: f in self.flags for f in RELEVANT_FLAGS},
                "int8_dot": self.int8_dot, "u8s8_saturates": self.u8s8_saturates, "source": self.source}


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text, x86 or ARM."""
    model, flags, part = "", frozenset(), ""
    for line in text.splitlines():
        if not line.strip():
            if flags:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features") and not flags:
            flags = frozenset(value.lower().split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value
        elif key == "cpu part" and not part:
            part = value
    if not model and part:
        model = f"ARM CPU part {part}"
    return model, flags


def read_cpu_features(cpuinfo: str | Path = "/proc/cpuinfo", env: Mapping[str, str] | None = None,
                      arch: str | None = None) -> CpuFeatures:
    env = os.environ if env is None else env
    arch = arch or platform.machine() or "unknown"
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            model, flags = parse_cpuinfo(f.read(_MAX_CPUINFO))
    except OSError:
        model, flags = "", frozenset()
    source = str(cpuinfo)
    override = env.get(FLAGS_ENV)
    if override is not None:
        flags, source = frozenset(re.split(r"[\s,]+", override.strip().lower())) - {""}, f"${FLAGS_ENV}"
    return CpuFeatures(arch, model or platform.processor() or "unknown", flags, source)
