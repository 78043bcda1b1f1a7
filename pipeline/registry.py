"""The host uses the agent's registry class: one definition on both sides of the wall."""

from device_agent.registry import Registry, UnknownNameError

__all__ = ["Registry", "UnknownNameError"]
