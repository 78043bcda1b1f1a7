"""The wall: every device_agent module imports with torch and the pipeline made unimportable."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
sys.modules["torch"] = None      # `import torch` now raises ImportError
sys.modules["pipeline"] = None
import device_agent
names = [m.name for m in pkgutil.walk_packages(device_agent.__path__, "device_agent.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "pipeline", "pydantic", "rich")
                and sys.modules[m] is not None)
print(len(names), leaked)
assert not leaked, leaked
"""


def test_agent_imports_without_torch_or_pipeline():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    count = int(proc.stdout.split()[0])
    assert count >= 10  # every module was walked, not an empty package
