"""``pipeline provision``: from a bare device with Python and SSH to an agent that reports online.

On the device (``ROOT`` = /opt/edgefleet as root, ~/.edgefleet-agent otherwise)::

    ROOT/releases/<agent version>/venv   one virtual environment per agent release
    ROOT/current -> releases/<version>   what runs; switched atomically (a rename)
    ROOT/agent.yaml, keys/, tls/         configuration and identity
    ROOT/state/                          the agent's slots and active model: never touched here
    ROOT/wheels/                         wheels fetched by the host (devices need no route to PyPI)

A new release is installed beside the running one and checked before ``current`` moves to it; then the
service restarts and the host waits for the device's status to carry the new agent version. If it never
does, ``current`` and the configuration go back to what they were and the previous agent restarts (on a
first install: the service stops and ``current`` is removed). Running it again with nothing changed
touches nothing.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from device_agent.config import BrokerConfig
from device_agent.runtimes import PIP_REQUIREMENTS

from ..errors import ProvisionError
from ..targets import TargetProfile
from .remote import Probe, Remote
from .services import SERVICES, Layout, ServiceManager
from .wheel import agent_requirements, agent_version, build_agent_wheel
from .wheelhouse import Platform, fetch_wheels

AGENT_PYTHON = (3, 11)  # the agent wheel's Requires-Python
RESERVED_IDS = {"host", "broker"}  # identities `pipeline broker config` issues for itself


@dataclass(frozen=True)
class HostPlan:
    device_id: str
    target: TargetProfile
    host: str
    port: int = 22
    user: str | None = None
    key: Path | None = None
    install_dir: str | None = None
    python: str = "python3"
    service: str = "auto"

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"


@dataclass(frozen=True)
class FleetSide:
    """What every device of the fleet gets, and how the host watches it come online."""

    workdir: Path
    broker_host: str  # as devices reach it
    broker_port: int
    broker_protocol: str
    host_broker: BrokerConfig  # as this host reaches it
    prefix: str
    signing_pub: Path
    ca_dir: Path | None = None  # TLS: the fleet CA (from `pipeline broker config`), to issue device identities
    metrics_interval_s: float = 30.0
    online_timeout_s: float = 60.0
    min_free_mb: float = 300.0
    strict_host_keys: bool = False


@dataclass
class HostResult:
    device_id: str
    where: str
    status: str = "pending"  # installed | upgraded | reconfigured | unchanged | failed
    step: str = "waiting"
    agent_version: str | None = None
    previous_version: str | None = None
    runtime: str | None = None
    service: str | None = None
    machine: str | None = None
    os: str | None = None
    python: str | None = None
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(plan: HostPlan, probe: Probe, fleet: FleetSide) -> None:
    where = plan.where
    if probe.system != "Linux":
        raise ProvisionError(f"{where}: unsupported system {probe.system}; the agent runs on Linux")
    if probe.machine != plan.target.arch:
        raise ProvisionError(f"{where}: unsupported architecture {probe.machine} for {plan.target.name} "
                             f"(targets/{plan.target.name}.yaml says {plan.target.arch}); a 64-bit OS is needed "
                             "on ARM boards")
    if probe.python[:2] < AGENT_PYTHON:
        raise ProvisionError(f"{where}: unsupported Python {'.'.join(map(str, probe.python))} ({probe.python_exe}); "
                             f"the agent needs {'.'.join(map(str, AGENT_PYTHON))} or newer")
    if not probe.venv:
        raise ProvisionError(f"{where}: Python's venv module is missing; install it (sudo apt-get install python3-venv)")
    if probe.free_mb < fleet.min_free_mb:
        raise ProvisionError(f"{where}: no disk space: {probe.free_mb:.0f} MB free for {probe.root}, "
                             f"{fleet.min_free_mb:.0f} MB needed")


def _service(plan: HostPlan, probe: Probe) -> ServiceManager:
    name = plan.service
    if name == "auto":
        name = ("systemd" if probe.uid == 0 and probe.systemd else
                "systemd-user" if probe.systemd_user else "background")
    return SERVICES.get(name)()


def _wheels(plan: HostPlan, probe: Probe, fleet: FleetSide) -> tuple[str, Path]:
    """The first of the target's runtimes PyPI has wheels for on this device, and the folder holding them."""
    platform = Platform(probe.machine, probe.python[:2], probe.glibc)
    reasons = []
    for runtime in plan.target.runtimes:
        if runtime not in PIP_REQUIREMENTS:
            continue
        try:
            return runtime, fetch_wheels(fleet.workdir / "wheelhouse", platform,
                                         agent_requirements() + PIP_REQUIREMENTS[runtime])
        except ProvisionError as exc:
            reasons.append(f"{runtime}: {exc}")
    raise ProvisionError(f"{plan.where}: no runtime of {plan.target.name} ({', '.join(plan.target.runtimes)}) "
                         f"installs on {platform.key}: " + "; ".join(reasons))


def agent_config(plan: HostPlan, fleet: FleetSide, runtime: str) -> str:
    broker: dict[str, Any] = {"host": fleet.broker_host, "port": fleet.broker_port, "protocol": fleet.broker_protocol}
    if fleet.ca_dir is not None:
        broker.update(ca_file="tls/ca.crt", cert_file="tls/device.crt", key_file="tls/device.key")
    config = {"device_id": plan.device_id, "target": plan.target.name, "state_dir": "state",
              "trusted_keys": ["keys/signing.pub"], "topic_prefix": fleet.prefix, "broker": broker,
              "runtime": runtime, "metrics_interval_s": fleet.metrics_interval_s}
    return "# Written by `pipeline provision`; provisioning again rewrites it.\n" + yaml.safe_dump(config, sort_keys=False)


def _identity(fleet: FleetSide, device_id: str) -> dict[str, Path]:
    """The device's TLS files, issued by the fleet CA on first use and reused after."""
    from ..broker.pki import CertificateAuthority

    assert fleet.ca_dir is not None
    if device_id in RESERVED_IDS:
        raise ProvisionError(f"device id {device_id!r} is reserved for the {device_id}'s own TLS identity; "
                             "give the device another id")
    if not (fleet.ca_dir / "ca.key").is_file():
        raise ProvisionError(f"TLS: {fleet.ca_dir / 'ca.key'} is needed to issue {device_id}'s certificate "
                             "(the CA `pipeline broker config` wrote)")
    folder = fleet.ca_dir / device_id
    cert, key = folder / f"{device_id}.crt", folder / f"{device_id}.key"
    if not (cert.is_file() and key.is_file()):
        ident = CertificateAuthority(fleet.ca_dir).issue(device_id)
        cert, key = ident.cert, ident.key
    return {"ca.crt": fleet.ca_dir / "ca.crt", "device.crt": cert, "device.key": key}


class _OnlineWatch:
    """Watches the device's live statuses for one carrying ``version``."""

    def __init__(self, fleet: FleetSide, device_id: str, version: str) -> None:
        from device_agent.protocol import Leaf, ProtocolError, Status, topic

        from ..ota.watch import Watch

        self.seen = False

        def on_message(name: str, payload: bytes) -> None:
            if not name:
                return
            try:
                if Status.parse(payload).agent_version == version:
                    self.seen = True
            except ProtocolError:
                pass

        # live statuses only: the retained one is the agent that ran before the restart, even at the same version
        self.watch = Watch(fleet.host_broker, fleet.prefix, [(topic(fleet.prefix, device_id, Leaf.STATUS), 1)],
                           on_message, name=f"provision-{device_id}", fresh_only=True)

    def wait(self, timeout_s: float) -> bool:
        """Until the device said it runs ``version``; False after ``timeout_s``."""
        return self.watch.until(lambda: self.seen, timeout_s)

    def __enter__(self) -> "_OnlineWatch":
        from device_agent.mqtt import ConnectError

        try:
            self.watch.start()
        except ConnectError as exc:
            raise ProvisionError(f"cannot watch the device come online: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.watch.stop()


def provision_host(plan: HostPlan, fleet: FleetSide, wheel: Path, version: str,
                   on_step: Callable[[HostResult], None] = lambda r: None) -> HostResult:
    result = HostResult(plan.device_id, plan.where)
    t0 = time.monotonic()

    def step(name: str) -> None:
        result.step = name
        on_step(result)

    try:
        step("connecting")
        with Remote(plan.host, plan.user, plan.port, plan.key, strict_host_keys=fleet.strict_host_keys) as remote:
            step("probing")
            probe = remote.probe(plan.python, plan.install_dir)
            result.machine, result.os = probe.machine, probe.os
            result.python = ".".join(map(str, probe.python))
            result.previous_version = probe.release
            _check(plan, probe, fleet)
            service = _service(plan, probe)
            result.service = service.name
            step("fetching wheels")
            runtime, wheel_dir = _wheels(plan, probe, fleet)
            result.runtime = runtime
            result.status = _install(remote, plan, probe, fleet, service, runtime, wheel_dir, wheel, version, step)
            result.agent_version = version
            step("done")
    except ProvisionError as exc:
        result.status, result.error = "failed", str(exc)
        step("failed")
    except Exception as exc:  # a bug or an unforeseen SSH failure: still one line, and the other hosts go on
        result.status, result.error = "failed", f"{plan.where}: {type(exc).__name__}: {exc}"
        step("failed")
    result.seconds = round(time.monotonic() - t0, 1)
    on_step(result)
    return result


def _install(remote: Remote, plan: HostPlan, probe: Probe, fleet: FleetSide, service: ServiceManager, runtime: str,
             wheel_dir: Path, wheel: Path, version: str, step: Callable[[str], None]) -> str:
    lay = Layout(probe.root, probe.home)
    q = shlex.quote
    root, release = q(lay.root), q(f"{lay.root}/releases/{version}")
    config = agent_config(plan, fleet, runtime)
    identity = _identity(fleet, plan.device_id) if fleet.ca_dir is not None else {}
    # everything the device gets besides the release: a rotated signing key or certificate is a change too
    digest = hashlib.sha256(config.encode() + fleet.signing_pub.read_bytes()
                            + b"".join(path.read_bytes() for _, path in sorted(identity.items()))).hexdigest()
    installed = remote.conn.run(f"cat {root}/PROVISIONED 2>/dev/null || true", hide=True, warn=True,
                                in_stream=False).stdout.strip()
    if probe.release == version and installed == digest and remote.ok(service.active(lay)):
        return "unchanged"

    remote.run(f"mkdir -p {root}/releases {root}/wheels {root}/keys {root}/state {root}/tls && chmod 700 {root}/tls",
               "creating the install directory")
    if not remote.ok(f"test -f {release}/RELEASE"):
        step("uploading")
        have = set(remote.run(f"ls -1 {root}/wheels", "listing wheels").split())
        for path in [*sorted(wheel_dir.glob("*.whl")), wheel]:
            if path.name not in have:
                remote.put(path, f"{lay.root}/wheels/{path.name}")
        step("installing")
        # a venv cannot be moved (its scripts name their own path): build it in place; RELEASE, written last,
        # marks it complete, and a directory without one (an interrupted install) is started over
        reqs = " ".join(q(r) for r in PIP_REQUIREMENTS[runtime])
        remote.run(f"rm -rf {release} && {q(probe.python_exe)} -m venv {release}/venv && "
                   f"{_seed(root, release, runtime, q(probe.python_exe))}"
                   f"{release}/venv/bin/python -m pip install --quiet --no-index --disable-pip-version-check "
                   f"--find-links {root}/wheels {q(lay.root + '/wheels/' + wheel.name)} {reqs} && "
                   f"echo {q(runtime)} > {release}/RUNTIME",
                   "installing the agent and its runtime", timeout_s=900)
        got = remote.run(f"{release}/venv/bin/device-agent --version", "running the new agent").strip()
        if got != version:
            raise ProvisionError(f"{plan.where}: the installed agent says {got!r}, expected {version!r}")
        remote.run(f"echo {q(version)} > {release}/RELEASE.tmp && mv {release}/RELEASE.tmp {release}/RELEASE",
                   "finishing the release")

    step("configuring")
    remote.write(f"{lay.root}/keys/signing.pub", fleet.signing_pub.read_text())
    for name, path in identity.items():
        remote.write(f"{lay.root}/tls/{name}", path.read_text(), 0o600 if name.endswith(".key") else 0o644)
    remote.write(f"{lay.config}.new", config, 0o600)
    # the new agent reads the new configuration before anything switches
    remote.run(f"{release}/venv/bin/device-agent status --config {q(lay.config + '.new')} >/dev/null",
               "checking the agent configuration")
    for path, text in service.files(lay).items():
        remote.write(path, text, 0o755 if path.endswith("agentctl") else 0o644)

    step("starting")
    previous = remote.conn.run(f"readlink {root}/current", hide=True, warn=True, in_stream=False).stdout.strip()
    switch = (f"cp -f {q(lay.config)} {q(lay.config + '.prev')} 2>/dev/null; "
              f"mv -f {q(lay.config + '.new')} {q(lay.config)} && "
              f"ln -sfn releases/{q(version)} {root}/current.new && mv -Tf {root}/current.new {root}/current")
    kept = f"restored the previous agent ({probe.release})" if previous else "left nothing running"
    with _OnlineWatch(fleet, plan.device_id, version) as watch:
        try:
            remote.run(switch, "switching to the new release")
            remote.run(service.restart(lay), f"starting the agent ({service.name})")
        except ProvisionError as exc:
            _restore(remote, lay, service, previous)
            raise ProvisionError(f"{exc}; {kept}") from None
        step("waiting online")
        if not watch.wait(fleet.online_timeout_s):
            log_tail = remote.conn.run(f"tail -n 5 {q(lay.log)} 2>/dev/null", hide=True, warn=True,
                                       in_stream=False).stdout.strip().replace("\n", " | ")
            _restore(remote, lay, service, previous)
            raise ProvisionError(f"{plan.where}: agent {version} did not report online within "
                                 f"{fleet.online_timeout_s:.0f} s; {kept}" + (f"; its log: {log_tail}" if log_tail else ""))
    remote.run(f"echo {digest} > {root}/PROVISIONED", "recording what was provisioned")
    # keep the running release and the one before it (to go back to), nothing older
    keep = {version, Path(previous).name} if previous else {version}
    remote.run(f"cd {root}/releases && for r in *; do case \" {' '.join(keep)} \" in *\" $r \"*) ;; "
               f"*) rm -rf \"$r\";; esac; done", "removing old releases")
    if probe.release is None:
        return "installed"
    return "upgraded" if probe.release != version else "reconfigured"


def _seed(root: str, release: str, runtime: str, python: str) -> str:
    """Shell that fills a new release's venv with the running release's installed packages, when that one was built
    for the same runtime by the same Python (its ``lib/pythonX.Y`` the new venv's): pip then installs only what
    changed (an agent-only upgrade: the agent's wheel) instead of unpacking and compiling the runtime again, minutes
    on a small board. Anything else leaves the venv as it was made, and a copy that fails (a full disk) makes it
    again: pip installs it all."""
    q = shlex.quote
    return (f"{{ lib=$(cd {release}/venv/lib && echo python3*); old={root}/current/venv/lib/$lib/site-packages; "
            f"if [ \"$(cat {root}/current/RUNTIME 2>/dev/null)\" = {q(runtime)} ] && [ -d \"$old\" ]; then "
            f"cp -a \"$old/.\" {release}/venv/lib/$lib/site-packages/ || "
            f"{{ rm -rf {release}/venv && {python} -m venv {release}/venv; }}; fi; }} && ")


def _restore(remote: Remote, lay: Layout, service: ServiceManager, previous: str) -> None:
    q = shlex.quote
    root = q(lay.root)
    if previous:
        remote.run(f"(test -f {q(lay.config + '.prev')} && mv -f {q(lay.config + '.prev')} {q(lay.config)}); "
                   f"ln -sfn {q(previous)} {root}/current.new && mv -Tf {root}/current.new {root}/current",
                   "restoring the previous release")
        remote.run(service.restart(lay), "restarting the previous agent")
    else:
        remote.run(f"{service.stop(lay)}; rm -f {root}/current", "stopping the failed agent")


def provision(plans: list[HostPlan], fleet: FleetSide, parallel: int = 8,
              on_step: Callable[[HostResult], None] = lambda r: None, build: str | None = None) -> list[HostResult]:
    """Every host, ``parallel`` at a time; a failure on one never stops the others. ``build``: a label in place
    of the sources' hash in the agent's version (a rebuild that must count as a new release)."""
    wheel = build_agent_wheel(fleet.workdir / "agent-wheel", build)
    version = agent_version(build)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(plans) or 1))) as pool:
        futures = [pool.submit(provision_host, p, fleet, wheel, version, on_step) for p in plans]
        return [f.result() for f in futures]


__all__ = ["FleetSide", "HostPlan", "HostResult", "agent_config", "provision", "provision_host"]
