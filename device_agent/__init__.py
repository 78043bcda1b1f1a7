"""The device agent: receives signed models over MQTT, verifies, activates, runs and reports.

This package is the device side of the wall: it never imports ``pipeline`` or torch.
It also owns the wire protocol (topics, message and manifest schemas, signatures),
which the host imports from here so that both ends share one definition.
"""

__version__ = "0.1.0"
