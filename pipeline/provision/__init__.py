"""Provisioning devices over SSH (Fabric): the agent wheel, wheels for the device's platform, a service
manager, and an install that switches atomically and rolls back when the new agent never reports online."""

from .provisioner import FleetSide, HostPlan, HostResult, provision, provision_host
from .wheel import agent_version, build_agent_wheel

__all__ = ["FleetSide", "HostPlan", "HostResult", "agent_version", "build_agent_wheel", "provision",
           "provision_host"]
