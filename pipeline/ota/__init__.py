"""Over-the-air delivery: local stand-in agents, the delivery itself, rollouts, commands and rollbacks."""

from .delivery import DeviceResult, deliver
from .local_fleet import LocalFleet

__all__ = ["DeviceResult", "LocalFleet", "deliver"]
