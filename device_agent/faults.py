"""Fault injection for the crash-safety tests.

``EDGEFLEET_CRASH_AT=<point>`` kills the agent with SIGKILL at that point of an update, as a power cut
would: verifying, installing, slot-marked, installed, testing, activated. Unset (always, in production)
this does nothing.
"""

from __future__ import annotations

import os
import signal

POINTS = ("verifying", "installing", "slot-marked", "installed", "testing", "activated")


def crash_point(name: str) -> None:
    if os.environ.get("EDGEFLEET_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
