"""Wheels for a device's platform, fetched on the host with pip and cached under WORKDIR/wheelhouse.

Devices then install with ``pip --no-index``: they need no route to PyPI, and a fleet of one platform
downloads each wheel once. ``pip download --platform`` asks for binary wheels of the device's machine,
glibc and CPython version; a platform PyPI has no wheel for (onnxruntime on 32-bit ARM) fails here,
on the host, with pip's reason, before the device is touched.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProvisionError

_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Platform:
    machine: str  # uname -m: x86_64, aarch64, armv7l
    python: tuple[int, int]
    glibc: tuple[int, int] | None  # None: musl or unknown

    @property
    def key(self) -> str:
        libc = f"glibc{self.glibc[0]}.{self.glibc[1]}" if self.glibc else "nolibc"
        return f"{self.machine}-cp{self.python[0]}{self.python[1]}-{libc}"

    def pip_platforms(self) -> list[str]:
        if self.glibc is None:
            raise ProvisionError(f"{self.machine} without glibc (musl?): PyPI's manylinux wheels do not install there")
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
        tags += [f"{name}_{self.machine}" for m, name in _LEGACY.items() if m <= minor]
        return tags + ["any"]


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def fetch_wheels(root: Path, platform: Platform, requirements: list[str], timeout_s: float = 600) -> Path:
    """All wheels ``requirements`` need on ``platform`` (with their dependencies), in one folder."""
    folder = root / platform.key
    with _lock(platform.key):  # hosts of one platform provisioned in parallel share one download
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--dest", str(folder), "--implementation", "cp",
               "--python-version", f"{platform.python[0]}{platform.python[1]}",
               *[a for tag in platform.pip_platforms() for a in ("--platform", tag)], *requirements]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProvisionError(f"downloading wheels for {platform.key} took over {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ProvisionError(f"no wheels for {platform.key} ({', '.join(requirements)}): {reason}")
    return folder
