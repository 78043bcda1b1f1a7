"""The agent wheel: ``device_agent`` alone, as the distribution ``edgefleet-agent``.

Written directly (a wheel is a zip with three metadata files), so building needs no build backend and
the result is reproducible: the version carries a hash of the agent's sources (``0.1.0+g1a2b3c4d5e``), which
is what the device reports back as its ``agent_version`` and how provisioning tells an upgrade from a no-op.
The inference runtime is not a dependency: provisioning installs the one that fits the device.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import re
import zipfile
from pathlib import Path

import device_agent
from device_agent.runtimes import PIP_REQUIREMENTS

DIST = "edgefleet-agent"
_RUNTIME_PACKAGES = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for reqs in PIP_REQUIREMENTS.values()
                     for r in reqs}


def _sources() -> list[tuple[str, bytes]]:
    root = Path(device_agent.__file__).parent
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
             and p.suffix in (".py", ".service", ".typed") and p.name != "_build.py"]
    return [(f"device_agent/{p.relative_to(root).as_posix()}", p.read_bytes()) for p in files]


def agent_build_id() -> str:
    h = hashlib.sha256()
    for name, data in _sources():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return "g" + h.hexdigest()[:10]


def agent_version(build: str | None = None) -> str:
    """``0.1.0+g<hash of the sources>``; ``build`` replaces the hash (a local build label)."""
    base = device_agent.__version__.split("+", 1)[0]
    return f"{base}+{build or agent_build_id()}"


def agent_requirements() -> list[str]:
    """The agent's own dependencies (the project's unconditional ones), less any inference runtime."""
    reqs = importlib.metadata.requires("edgefleet") or []
    out = []
    for r in reqs:
        if "extra ==" in r:
            continue
        name = re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower()
        if name not in _RUNTIME_PACKAGES:
            out.append(r)
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_agent_wheel(out_dir: Path, build: str | None = None) -> Path:
    """Write ``edgefleet_agent-<version>-py3-none-any.whl`` into ``out_dir`` (reused when already there)."""
    version = agent_version(build)
    build = version.split("+", 1)[1]
    path = out_dir / f"{DIST.replace('-', '_')}-{version}-py3-none-any.whl"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    info = f"{DIST.replace('-', '_')}-{version}.dist-info"
    metadata = "\n".join([
        "Metadata-Version: 2.1", f"Name: {DIST}", f"Version: {version}",
        "Summary: edgefleet device agent: signed OTA model updates, A/B slots, inference and metrics",
        "Requires-Python: >=3.11", *[f"Requires-Dist: {r}" for r in agent_requirements()],
        *[f"Provides-Extra: {name}" for name in PIP_REQUIREMENTS],
        *[f"Requires-Dist: {r}; extra == \"{name}\"" for name, reqs in PIP_REQUIREMENTS.items() for r in reqs],
    ]) + "\n"
    files = [*_sources(), ("device_agent/_build.py", f'BUILD = "{build}"\n'.encode()),
             (f"{info}/METADATA", metadata.encode()),
             (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgefleet\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
             (f"{info}/entry_points.txt", b"[console_scripts]\ndevice-agent = device_agent.cli:main\n")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
        record = "\n".join([_record_line(n, d) for n, d in files] + [f"{info}/RECORD,,"]) + "\n"
        z.writestr(zipfile.ZipInfo(f"{info}/RECORD", date_time=(2020, 1, 1, 0, 0, 0)), record)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path
