"""The commands that only read deploy.yaml and the fleet store run without torch (torchao's test_lean_import).

Each runs in a fresh interpreter whose import system refuses torch (and the export stack's onnx): a command
that reaches for them fails, and an ImportError swallowed on the way is still recorded and fails the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

#: refused outright; onnxruntime is the agent's runtime and may load where a command needs it
BLOCKED = ("torch", "torchvision", "torch_pruning", "onnx", "onnxslim", "onnxscript")
REPORTED = ("onnxruntime", "numpy", "paho", "starlette", "uvicorn", "prometheus_client")

RUNNER = """
import atexit, importlib.abc, json, sys
BLOCKED, REPORTED = {blocked!r}, {reported!r}
tried = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"{{name}} is blocked by test_lean_import")
        return None

sys.meta_path.insert(0, Refuse())

@atexit.register
def _report():
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(REPORTED))
    sys.stderr.write("\\nLEAN-IMPORT " + json.dumps({{"tried": sorted(set(tried)), "loaded": loaded}}) + "\\n")

from pipeline.cli import main
sys.argv = ["pipeline", *sys.argv[1:]]
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.exit(code)
""".format(blocked=BLOCKED, reported=REPORTED)

COMMANDS = {
    "help": ["--help"],
    "fleet-status": ["fleet", "status", "--json", "--config", "{cfg}"],
    "fleet-drift": ["fleet", "drift", "--json", "--config", "{cfg}"],
    "dashboard-help": ["dashboard", "--help"],
    "devices": ["devices", "--offline", "--json", "--config", "{cfg}"],
    "history": ["history", "--json", "--config", "{cfg}"],
    "config-schema": ["config", "schema", "--json"],
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lean")
    shutil.copy(REPO / "deploy.yaml", root / "deploy.yaml")
    return root / "deploy.yaml"


def run_blocked(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("LEAN-IMPORT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return proc, json.loads(line.removeprefix("LEAN-IMPORT "))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_runs_without_torch(cfg, name):
    args = [a.format(cfg=cfg) for a in COMMANDS[name]]
    proc, imports = run_blocked(args, cfg.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert imports["tried"] == [], f"{name} reached for {imports['tried']}"
    print(f"{name}: loads {', '.join(imports['loaded']) or 'nothing heavy'}")  # pytest -s lists them


def test_a_bad_deploy_yaml_is_refused_without_torch(cfg, tmp_path):
    """Validation itself (every recipe step, every name) needs no torch: exit 2, one message, every problem."""
    bad = tmp_path / "deploy.yaml"
    bad.write_text(cfg.read_text().replace("method: magnitude", "method: voodoo")
                   + "recipes:\n  fast: [{method: structured, ratio: 1.5}]\n")
    proc, imports = run_blocked(["fleet", "status", "--config", str(bad)], tmp_path)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and err.count("error:") == 1, err
    assert "compress[0].method: unknown compression method 'voodoo'" in err
    assert "recipes.fast[0] (structured): ratio: Input should be less than 1" in err
    assert imports["tried"] == []


def test_torch_free_name_tables_match_the_registries():
    """The names config validates against without torch are the registries' own."""
    from pipeline.compress import METHODS
    from pipeline.compress.importance import CRITERIA
    from pipeline.compress.params import CRITERION_NAMES
    from pipeline.config import ZOO_NAMES
    from pipeline.models import MODELS

    assert list(CRITERION_NAMES) == CRITERIA.names()
    assert list(ZOO_NAMES) == MODELS.names()
    for name in METHODS:
        spec = METHODS.get(name)
        assert spec.load().Params is spec.params and spec.load().name == name


def test_config_schema_lists_every_method(cfg):
    from pipeline.compress import METHODS
    from pipeline.config import json_schema

    schema = json_schema()
    mapping = schema["properties"]["compress"]["items"]["discriminator"]["mapping"]
    assert sorted(mapping) == METHODS.names()
    assert "base_dir" not in schema["properties"] and "source" not in schema["properties"]
    step = schema["$defs"][mapping["magnitude"].rsplit("/", 1)[1]]
    assert step["properties"]["sparsity"]["exclusiveMaximum"] == 1 and "sparsity" in step["required"]
