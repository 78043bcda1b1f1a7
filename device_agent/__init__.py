"""The device agent: receives signed models over MQTT, verifies, activates, runs and reports.

This package is the device side of the wall: it never imports ``pipeline`` or torch.
It also owns the wire protocol (topics, message and manifest schemas, signatures),
which the host imports from here so that both ends share one definition.
"""

try:  # written into the wheel `pipeline provision` builds: a hash of these sources, so each build is told apart
    from ._build import BUILD
except ImportError:  # a source checkout or an editable install
    BUILD = None

__version__ = "0.1.0" + (f"+{BUILD}" if BUILD else "")
