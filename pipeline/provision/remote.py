"""One SSH connection to a device (Fabric), with failures turned into one clear sentence each, and the probe
that tells what the device is before anything is written to it."""

from __future__ import annotations

import json
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ProvisionError

PROBE = r"""
import json, os, platform, shutil, subprocess, sys
root = os.path.expanduser(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else ""
uid = os.getuid()
if not root:
    root = "/opt/edgefleet" if uid == 0 else os.path.expanduser("~/.edgefleet-agent")
root = os.path.abspath(root)
probe = root
while not os.path.exists(probe):
    probe = os.path.dirname(probe) or "/"
st = os.statvfs(probe)
libc, ver = platform.libc_ver()
def ok(*cmd):
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
systemctl = shutil.which("systemctl") is not None
try:
    import ensurepip, venv
    has_venv = True
except ImportError:
    has_venv = False
release = None
try:
    with open(os.path.join(root, "current", "RELEASE")) as f:
        release = f.read().strip()
except OSError:
    pass
os_name = ""
try:
    with open("/etc/os-release") as f:
        os_name = dict(l.rstrip().split("=", 1) for l in f if "=" in l).get("PRETTY_NAME", "").strip('"')
except OSError:
    pass
print(json.dumps({
    "machine": platform.machine(), "system": platform.system(), "os": os_name,
    "python": list(sys.version_info[:3]), "python_exe": sys.executable,
    "glibc": [int(x) for x in ver.split(".")[:2]] if libc == "glibc" and ver else None,
    "uid": uid, "user": os.environ.get("USER") or "", "home": os.path.expanduser("~"), "root": root,
    "free_mb": st.f_bavail * st.f_frsize / 2**20, "venv": has_venv, "release": release,
    "systemd": systemctl and os.path.isdir("/run/systemd/system"),
    "systemd_user": systemctl and uid != 0 and ok("systemctl", "--user", "show-environment"),
}))
"""


@dataclass(frozen=True)
class Probe:
    machine: str
    system: str
    os: str
    python: tuple[int, int, int]
    python_exe: str
    glibc: tuple[int, int] | None
    uid: int
    user: str
    home: str
    root: str  # the install dir, absolute
    free_mb: float
    venv: bool
    release: str | None  # the agent release installed and current, if any
    systemd: bool
    systemd_user: bool

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "Probe":
        return cls(**{**data, "python": tuple(data["python"]),
                      "glibc": tuple(data["glibc"]) if data.get("glibc") else None})


class Remote:
    """``with Remote(host, user, port, key) as r: r.run("...")``: a Fabric connection that explains failures."""

    def __init__(self, host: str, user: str | None, port: int, key: Path | None, timeout_s: float = 10,
                 strict_host_keys: bool = False) -> None:
        """``strict_host_keys``: only hosts already in known_hosts (Fabric's default accepts unknown ones; a
        known host whose key changed is refused either way)."""
        import paramiko
        from fabric import Connection

        self.where = f"{user + '@' if user else ''}{host}:{port}"
        self.key = key
        connect_kwargs: dict[str, Any] = {"banner_timeout": timeout_s, "auth_timeout": timeout_s}
        if key is not None:
            if not key.is_file():
                raise ProvisionError(f"{self.where}: SSH key {key} does not exist")
            connect_kwargs.update(key_filename=str(key), look_for_keys=False, allow_agent=False)
        self.conn = Connection(host, user=user, port=port, connect_timeout=timeout_s, connect_kwargs=connect_kwargs)
        self.strict = strict_host_keys
        if strict_host_keys:
            self.conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def __enter__(self) -> "Remote":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def open(self) -> None:
        import paramiko

        try:
            self.conn.open()
        except paramiko.AuthenticationException:
            how = f"the key {self.key}" if self.key else "your SSH agent and ~/.ssh keys"
            raise ProvisionError(f"{self.where}: authentication refused with {how}") from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            reason = next(iter(exc.errors.values()), exc)
            raise ProvisionError(f"{self.where}: unreachable ({getattr(reason, 'strerror', None) or reason})") from None
        except (socket.timeout, TimeoutError):
            raise ProvisionError(f"{self.where}: unreachable (no answer within the timeout)") from None
        except socket.gaierror as exc:
            raise ProvisionError(f"{self.where}: unknown host ({exc.strerror})") from None
        except OSError as exc:
            raise ProvisionError(f"{self.where}: unreachable ({exc.strerror or exc})") from None
        except paramiko.BadHostKeyException as exc:
            raise ProvisionError(f"{self.where}: the host key changed ({exc}); if that is expected, remove the old "
                                 "one from ~/.ssh/known_hosts") from None
        except paramiko.SSHException as exc:
            if self.strict and "not found in known_hosts" in str(exc):
                raise ProvisionError(f"{self.where}: unknown host key (strict host keys: add it to "
                                     "~/.ssh/known_hosts first, e.g. with ssh-keyscan)") from None
            raise ProvisionError(f"{self.where}: SSH failed ({exc})") from None

    def run(self, command: str, what: str, timeout_s: float = 600) -> str:
        """Run ``command`` with sh; a non-zero exit is a ProvisionError naming ``what`` and the output's tail."""
        result = self.conn.run(f"sh -c {shlex.quote(command)}", hide=True, warn=True, in_stream=False,
                               timeout=timeout_s)
        if result.exited != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
            raise ProvisionError(f"{self.where}: {what} failed (exit {result.exited}): {' | '.join(tail)}")
        return result.stdout

    def ok(self, command: str) -> bool:
        return self.conn.run(f"sh -c {shlex.quote(command)}", hide=True, warn=True, in_stream=False).exited == 0

    def put(self, local: Path, remote: str) -> None:
        self.conn.put(str(local), remote)

    def write(self, remote: str, text: str, mode: int = 0o644) -> None:
        """Write a file atomically: a temporary beside it, then a rename."""
        import io

        tmp = f"{remote}.tmp"
        self.run(f"mkdir -p {shlex.quote(str(Path(remote).parent))}", f"creating {Path(remote).parent}")
        self.conn.put(io.BytesIO(text.encode()), tmp)
        self.run(f"chmod {mode:o} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(remote)}",
                 f"writing {remote}")

    def probe(self, python: str, install_dir: str | None) -> Probe:
        if not self.ok(f"command -v {shlex.quote(python)}"):
            raise ProvisionError(f"{self.where}: no Python ({python!r} is not on the PATH); install python3")
        out = self.run(f"{shlex.quote(python)} -c {shlex.quote(PROBE)} {shlex.quote(install_dir or '')}",
                       "probing the device")
        try:
            return Probe.parse(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ProvisionError(f"{self.where}: the probe answered something unexpected ({exc}): {out[-200:]!r}") \
                from None
