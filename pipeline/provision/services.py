"""How the agent is kept running on a device: one registry entry per service manager.

- ``systemd``: a system unit (root on a systemd device);
- ``systemd-user``: a user unit, with lingering so it runs without a login (not root);
- ``background``: no systemd (containers, minimal images): a supervisor shell loop in its own session,
  restarting the agent after a crash, with a pid file; ``agentctl start|stop|restart|status``.

Each renders the files to write and the shell commands to (re)start, stop and check the agent; the
provisioner runs them over SSH.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from importlib import resources

from ..registry import Registry

UNIT = "edgefleet-agent"


@dataclass(frozen=True)
class Layout:
    """Where an installation lives on the device."""

    root: str  # install dir, absolute
    home: str

    @property
    def config(self) -> str:
        return f"{self.root}/agent.yaml"

    @property
    def exe(self) -> str:
        return f"{self.root}/current/venv/bin/device-agent"

    @property
    def log(self) -> str:
        return f"{self.root}/agent.log"


class ServiceManager:
    name: str

    def files(self, lay: Layout) -> dict[str, str]:
        return {}

    def restart(self, lay: Layout) -> str: ...

    def stop(self, lay: Layout) -> str: ...

    def active(self, lay: Layout) -> str: ...


SERVICES: Registry[type[ServiceManager]] = Registry("service manager")


def _unit(lay: Layout, user: bool) -> str:
    """The unit shipped with the agent, pointed at this installation."""
    text = resources.files("device_agent").joinpath("systemd", f"{UNIT}.service").read_text()
    text = text.replace("/opt/edgefleet/venv/bin/device-agent", lay.exe).replace("/etc/edgefleet/agent.yaml",
                                                                                  lay.config)
    text = text.replace("WorkingDirectory=/var/lib/edgefleet", f"WorkingDirectory={lay.root}")
    text = text.replace("ReadWritePaths=/var/lib/edgefleet", f"ReadWritePaths={lay.root}")
    text = text.replace("StateDirectory=edgefleet\n", "")
    if user or lay.root.startswith(("/home/", "/root")):  # the agent's files are in a home directory
        text = text.replace("ProtectHome=true\n", "")
    if user:  # user managers cannot apply these
        for line in ("ProtectSystem=strict\n", f"ReadWritePaths={lay.root}\n", "PrivateTmp=true\n"):
            text = text.replace(line, "")
        text = text.replace("WantedBy=multi-user.target", "WantedBy=default.target")
    return text


@SERVICES.register("systemd")
class Systemd(ServiceManager):
    name = "systemd"

    def files(self, lay: Layout) -> dict[str, str]:
        return {f"/etc/systemd/system/{UNIT}.service": _unit(lay, user=False)}

    def restart(self, lay: Layout) -> str:
        return f"systemctl daemon-reload && systemctl enable --quiet {UNIT} && systemctl restart {UNIT}"

    def stop(self, lay: Layout) -> str:
        return f"systemctl stop {UNIT} || true"

    def active(self, lay: Layout) -> str:
        return f"systemctl is-active --quiet {UNIT}"


@SERVICES.register("systemd-user")
class SystemdUser(ServiceManager):
    name = "systemd-user"

    def files(self, lay: Layout) -> dict[str, str]:
        return {f"{lay.home}/.config/systemd/user/{UNIT}.service": _unit(lay, user=True)}

    def restart(self, lay: Layout) -> str:
        return (f"(loginctl enable-linger \"$(id -un)\" 2>/dev/null || true) && systemctl --user daemon-reload && "
                f"systemctl --user enable --quiet {UNIT} && systemctl --user restart {UNIT}")

    def stop(self, lay: Layout) -> str:
        return f"systemctl --user stop {UNIT} || true"

    def active(self, lay: Layout) -> str:
        return f"systemctl --user is-active --quiet {UNIT}"


_AGENTCTL = """#!/bin/sh
# The edgefleet agent without systemd: a supervisor loop in its own session restarts it after a crash.
# Written by `pipeline provision`. Usage: agentctl start|stop|restart|status
D={root}
PID="$D/agent.pid"
# The supervisor leads its own process group: the service runs while any process of that group lives.
# Zombies do not count (in a container whose PID 1 never reaps them, `kill -0` would still succeed).
group_alive() {{
  for f in /proc/[0-9]*/stat; do
    read -r s <"$f" 2>/dev/null || continue
    s=${{s##*) }}
    set -- $s
    if [ "$3" = "$PG" ] && [ "$1" != Z ]; then return 0; fi
  done
  return 1
}}
# the pid file holds the supervisor's pid (its process group) and start time: after a reboot the pid may
# belong to some other process, which must never be taken for the agent, let alone signalled
start_time() {{
  read -r s <"/proc/$1/stat" 2>/dev/null || return 1
  s=${{s##*) }}
  set -- $s
  echo "${{20}}"
}}
running() {{
  [ -f "$PID" ] || return 1
  read -r PG START <"$PID" || return 1
  [ -n "$PG" ] && [ "$(start_time "$PG")" = "$START" ] && group_alive
}}
case "$1" in
  start)
    running && exit 0
    cd "$D" || exit 1
    # restarts the agent when it exits; a quick death doubles the delay (3 s -> 5 min), a run of a minute resets it
    setsid sh -c 'd=3; while :; do t=$(date +%s); "$0/current/venv/bin/device-agent" run --config "$0/agent.yaml"
      [ $(($(date +%s) - t)) -ge 60 ] && d=3
      echo "agentctl: the agent exited; starting it again in $d s"; sleep $d
      d=$((d * 2)); [ $d -gt 300 ] && d=300; done' \\
      "$D" >>"$D/agent.log" 2>&1 </dev/null &
    echo "$! $(start_time $!)" >"$PID" ;;
  stop)
    if running; then
      kill -TERM "-$PG" 2>/dev/null
      i=0; while running && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
      running && kill -KILL "-$PG" 2>/dev/null
    fi
    rm -f "$PID" ;;
  restart) sh "$0" stop; sh "$0" start ;;
  status) running ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
"""


@SERVICES.register("background")
class Background(ServiceManager):
    name = "background"

    def files(self, lay: Layout) -> dict[str, str]:
        return {f"{lay.root}/agentctl": _AGENTCTL.format(root=shlex.quote(lay.root))}

    def _ctl(self, lay: Layout, action: str) -> str:
        return f"sh {shlex.quote(lay.root + '/agentctl')} {action}"

    def restart(self, lay: Layout) -> str:
        return self._ctl(lay, "restart")

    def stop(self, lay: Layout) -> str:
        return self._ctl(lay, "stop")

    def active(self, lay: Layout) -> str:
        return self._ctl(lay, "status")
