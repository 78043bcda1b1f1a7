"""The host's record of the fleet: deployments and their per-device outcomes, telemetry (SQLite or PostgreSQL)."""

from pathlib import Path

from .sql import ERRORS as STORE_ERRORS
from .sql import POSTGRES, engine_of, redact
from .store import FleetStore


def location(text: str) -> Path | str:
    """A store named on the command line: a ``postgresql://`` URL as it is, anything else a SQLite file's path."""
    return text if engine_of(text) == POSTGRES else Path(text)


def exists(where: Path | str) -> bool:
    """Whether there is a store to read: a SQLite file that exists; a server (PostgreSQL) is asked when opened."""
    return engine_of(where) == POSTGRES or Path(where).is_file()


__all__ = ["STORE_ERRORS", "FleetStore", "exists", "location", "redact"]
