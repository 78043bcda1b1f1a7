"""Provisioning devices over SSH (Fabric): the agent wheel, wheels for the device's platform, a service
manager, and an install that switches atomically and rolls back when the new agent never reports online.

The names below load their module on first use, so importing one piece (``provision.wheel``,
``provision.services``) does not bring in the rest."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .provisioner import FleetSide, HostPlan, HostResult, provision, provision_host
    from .wheel import agent_version, build_agent_wheel

_EXPORTS = {"FleetSide": "provisioner", "HostPlan": "provisioner", "HostResult": "provisioner",
            "provision": "provisioner", "provision_host": "provisioner", "agent_version": "wheel",
            "build_agent_wheel": "wheel"}
__all__ = ["FleetSide", "HostPlan", "HostResult", "agent_version", "build_agent_wheel", "provision",
           "provision_host"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
