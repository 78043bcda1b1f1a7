"""Installed, not editable: the project's wheel and the agent's wheel, each in a venv of its own.

How the venvs are made clean without downloading anything (the suite runs offline):

* ``python -m venv --without-pip``: no system site-packages, no editable install, no pip of its own; each wheel
  is installed with ``pip --python <venv> install --no-deps --no-index``, run from this interpreter.
* The host wheel's third-party dependencies (torch among them) come from this interpreter's site-packages
  through one ``.pth`` line. A path listed in a ``.pth`` file is only appended to ``sys.path``; the ``.pth``
  files inside it are not executed, so the editable install's finder (``__editable__.edgefleet-*.pth``) is never
  installed there, and the test asserts that ``pipeline`` is imported from the venv's own site-packages.
* The agent's venv sees only the distributions its wheel declares (numpy, paho-mqtt, cryptography, pyyaml,
  psutil and the onnxruntime extra) and what they require in turn: a directory of symlinks to exactly those
  distributions' files, listed by their RECORDs, behind one ``.pth`` line. ``pip check`` there proves the
  declared requirements are met, and ``import torch`` and ``import pipeline`` must fail: the wall around
  ``device_agent`` is proven by installation, not only by blocking imports.

Both run from a working directory outside the repository, with ``$HOME`` in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO, require

pytestmark = pytest.mark.slow

#: what a build of the project's wheel needs from the checkout
_SOURCES = ["pyproject.toml", "README.md", "pipeline", "device_agent", "targets"]
_PROBE = ("import importlib.util, json, sys\n"
          "out = {m: getattr(importlib.util.find_spec(m), 'origin', None) for m in sys.argv[1:]}\n"
          "print(json.dumps(out))\n")


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _clean_venv(path: Path, home: Path) -> tuple[Path, Path, dict]:
    """A venv without pip or system site-packages; (its python, its site-packages, an environment to run it in)."""
    require(shutil.which("pip", path=str(Path(sys.executable).parent)) is not None, "pip in this environment")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    py = path / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "PYTHONNOUSERSITE": "1"}
    return py, site, env


def _pip_install(py: Path, wheel: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel],
         Path.cwd(), {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _probe(py: Path, cwd: Path, env: dict, *modules: str) -> dict:
    return json.loads(_run([py, "-c", _PROBE, *modules], cwd, env).stdout)


def _build_project_wheel(out: Path) -> Path:
    """``pip wheel`` of a copy of the checkout (so the build leaves nothing behind in it), without isolation: the
    build backend (setuptools) is this environment's, nothing is downloaded."""
    require(importlib.util.find_spec("setuptools") is not None, "setuptools in this environment")
    src = out / "src"
    src.mkdir(parents=True)
    for name in _SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_build.py"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out / "dist", src], out, {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=180)
    [wheel] = (out / "dist").glob("edgefleet-*.whl")
    return wheel


def test_the_project_wheel_has_its_targets_and_runs_targets_and_profile(tmp_path, tiny_onnx):
    wheel = _build_project_wheel(tmp_path / "build")
    yamls = sorted(p.name for p in (REPO / "targets").glob("*.yaml"))
    assert {f"pipeline/_targets/{n}" for n in yamls} <= set(zipfile.ZipFile(wheel).namelist())

    py, site, env = _clean_venv(tmp_path / "venv", tmp_path / "home")
    (site / "_host_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _pip_install(py, wheel)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    found = _probe(py, cwd, env, "pipeline", "pipeline._targets", "device_agent")
    for module, origin in found.items():
        assert origin and Path(origin).is_relative_to(site), f"{module} is imported from {origin}, not {site}"
    user = json.loads(_run([py, "-c", "import json; from pipeline.targets import user_dir, packaged_dir; "
                            "print(json.dumps([str(user_dir()), str(packaged_dir())]))"], cwd, env).stdout)
    assert user == [str(tmp_path / "home" / ".config" / "edgefleet" / "targets"), str(site / "pipeline" / "_targets")]

    listed = json.loads(_run([py.parent / "pipeline", "targets", "--json"], cwd, env).stdout)
    assert sorted(t["name"] for t in listed) == [Path(n).stem for n in yamls]

    proc = subprocess.run([py.parent / "pipeline", "profile", tiny_onnx, "--target", "rpi4", "--runs", "5", "--json"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: a budget fails, still a complete report
    report = json.loads(proc.stdout)
    assert report["target"] == "rpi4" and report["predicted"]["latency_ms"] > 0
    assert {b["name"] for b in report["budgets"]} >= {"latency_ms", "model_size_mb"}


def _requirements(wheel: Path, extra: str) -> list:
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        [meta] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra})]


def _dependency_closure(reqs: list) -> dict[str, metadata.Distribution]:
    """The installed distributions ``reqs`` name, and theirs in turn (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = found[key] = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name}, which the agent needs, is not installed here")
        todo += [r for r in map(Requirement, dist.requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    return found


def _link_distributions(dists: dict[str, metadata.Distribution], into: Path) -> None:
    into.mkdir()
    for name, dist in dists.items():
        assert dist.files, f"{name} has no RECORD: cannot tell its files"
        tops = {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            if not (into / top).exists():
                (into / top).symlink_to(Path(dist.locate_file(top)).resolve())


def test_the_agent_wheel_alone_runs_with_only_its_declared_dependencies(tmp_path, tiny_onnx):
    from pipeline.provision.wheel import build_agent_wheel

    wheel = build_agent_wheel(tmp_path / "dist")
    reqs = _requirements(wheel, "onnxruntime")
    assert {r.name for r in reqs} == {"numpy", "paho-mqtt", "cryptography", "pyyaml", "psutil", "onnxruntime"}
    deps = _dependency_closure(reqs)
    assert not {"torch", "edgefleet", "pydantic", "rich"} & set(deps), sorted(deps)

    py, site, env = _clean_venv(tmp_path / "venv", tmp_path / "home")
    _link_distributions(deps, tmp_path / "deps")
    (site / "_agent_dependencies.pth").write_text(f"{tmp_path / 'deps'}\n")
    _pip_install(py, wheel)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    _run([sys.executable, "-m", "pip", "--python", py, "check"], cwd, env)  # every declared requirement is met

    found = _probe(py, cwd, env, "device_agent", "torch", "pipeline", "onnxruntime")
    assert found["torch"] is None and found["pipeline"] is None, found
    assert Path(found["device_agent"]).is_relative_to(site) and found["onnxruntime"], found

    assert "bench" in _run([py.parent / "device-agent", "--help"], cwd, env).stdout
    bench = json.loads(_run([py.parent / "device-agent", "bench", tiny_onnx, "--runs", "5"], cwd, env).stdout)
    assert bench["runs"] == 5 and bench["latency_ms_p50"] > 0 and bench["rss_mb"] > 0, bench


def test_the_package_list_holds_every_package():
    """pyproject.toml lists the packages (targets/ is mapped onto pipeline._targets); a new subpackage that is
    not listed would be missing from every wheel."""
    import tomllib

    from setuptools import find_packages

    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted([*find_packages(str(REPO), include=["pipeline*", "device_agent*"]),
                                     "pipeline._targets"])
