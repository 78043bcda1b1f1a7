"""Over-the-air delivery: a broker (the user's or a local one), local stand-in agents, the delivery itself."""

from .broker import BROKERS, LocalBroker
from .delivery import DeviceResult, deliver
from .local_fleet import LocalFleet

__all__ = ["BROKERS", "DeviceResult", "LocalBroker", "LocalFleet", "deliver"]
