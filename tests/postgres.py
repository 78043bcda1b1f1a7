"""A real PostgreSQL server for tests and benches: a throwaway cluster (Debian's ``postgresql`` binaries, initdb and
pg_ctl) in a temporary directory, listening on a Unix socket in that directory and a free loopback port.

    with LocalPostgres(tmp_path / "pg") as pg:
        url = pg.url("fleet")          # postgresql://edgefleet@127.0.0.1:PORT/fleet (the database is created)

As root (CI containers), the server runs as the ``postgres`` system user (initdb refuses root) and the directory
is handed to it. The cluster trusts local connections: it is a test fixture, never a deployment.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

USER = "edgefleet"


def binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: the newest /usr/lib/postgresql/<major>/bin, or the PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self, root: Path) -> None:
        bindir = binaries()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql); `make install` "
                                    "installs it")
        self.bin, self.root = bindir, Path(root)
        self.data, self.port = self.root / "data", _free_port()
        self._run_as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            pwd.getpwnam("postgres")
            self._run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self._run_as, *cmd], capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> "LocalPostgres":
        """Start the server (after ``stop``: the same cluster, on the same port)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            shutil.chown(self.root, "postgres", "postgres")
            # the server must reach its directory through every parent (pytest's tmp dirs are 0700 root's)
            for parent in self.root.resolve().parents:
                if parent.stat().st_uid == 0 and not parent.stat().st_mode & 0o001:
                    parent.chmod(parent.stat().st_mode | 0o001)
        if not (self.data / "PG_VERSION").exists():  # a new cluster; else the same one again (a restart)
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                "-c shared_buffers=64MB")
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                         "-o", opts, "-w", "-t", "60", "start", check=False)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:] if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start in {self.root}: {done.stderr.strip()}\n{log}")
        return self

    def url(self, database: str = "fleet") -> str:
        """A URL of ``database`` on this server, created on first use."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, database,
                  check=False)
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: at once (what a test's end needs; with this cluster's settings the last commits may be
        lost, as in a crash); ``fast``: every commit kept, as a server's orderly restart."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
