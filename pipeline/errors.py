"""The pipeline's error vocabulary. The CLI prints these without a traceback; each has an exit code."""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error raised on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(PipelineError):
    """deploy.yaml, a target file or a command-line value is invalid (names file, field, what is allowed)."""

    exit_code = 2


class BudgetError(PipelineError):
    """The model does not fit a budget of its target; ``--force`` deploys it anyway."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class ModelError(PipelineError):
    """A model factory, checkpoint or model file cannot be loaded or run."""


class DataError(PipelineError):
    """A dataset is unknown, unreadable or has the wrong shape."""


class ExportError(PipelineError):
    """Export or quantization failed, or the result does not match the PyTorch model."""


class DeliveryError(PipelineError):
    """The broker or the devices could not be reached, or a delivery could not be started."""

    exit_code = 4


class CompressionError(PipelineError):
    """A recipe cannot be applied to this model (it would remove a layer, the model cannot be traced...)."""


class StoreError(PipelineError):
    """The fleet store cannot be opened: a SQLite file that cannot be created or read, a PostgreSQL server that
    cannot be reached or refuses (names the store, a URL's password left out)."""

    exit_code = 6


class ProvisionError(PipelineError):
    """A device could not be provisioned over SSH (unreachable, refused, unsupported, no space, failed upgrade)."""

    exit_code = 5
