"""The host's record of the fleet: deployments and their per-device outcomes (SQLite)."""

from .store import FleetStore

__all__ = ["FleetStore"]
