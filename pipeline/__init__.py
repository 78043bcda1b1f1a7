"""Host side: compress, export, profile, sign and deliver PyTorch models to device fleets."""

__version__ = "0.1.0"
