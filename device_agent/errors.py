"""The agent's error vocabulary. Each message says what was expected, what came, what to do."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the device agent raises on purpose."""


class ConfigError(AgentError):
    """The agent configuration file is missing, unreadable or invalid."""


class ProtocolError(AgentError):
    """A message on the wire does not follow the protocol (malformed JSON, missing field, bad type)."""


class VerificationError(AgentError):
    """An artifact or manifest failed a check: signature, hash, length, version, target or expiry.

    ``result_code`` follows the LwM2M Firmware Update object's result numbering.
    """

    def __init__(self, message: str, result_code: int) -> None:
        super().__init__(message)
        self.result_code = result_code


class RuntimeBackendError(AgentError):
    """The inference runtime cannot load or run a model."""


class HealthCheckError(AgentError):
    """A model loaded but failed its health check (golden vectors, latency or memory)."""
