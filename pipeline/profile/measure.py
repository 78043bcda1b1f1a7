"""Measure a model on this host the way a device runs it: the agent's own benchmark, in a fresh process.

A fresh process keeps torch and the pipeline out of the resident-memory figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelError


def measure_on_host(path: Path, threads: int, runs: int = 100, runtime: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "device_agent.cli", "bench", str(path), "--threads", str(threads), "--runs", str(runs)]
    if runtime:
        cmd += ["--runtime", runtime]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ModelError(f"{path}: benchmark on this host failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
