"""Errors that dspark raises for bad input. Each message says what is wrong and how to fix it."""
from .backends import BackendUnavailableError


class DSparkError(Exception):
    """Base class of dspark's own errors."""


class CheckpointError(DSparkError, ValueError):
    """A model directory is missing, incomplete, corrupt or of an unsupported architecture."""


class DraftMismatchError(DSparkError, ValueError):
    """A draft does not fit its target (vocabulary, hidden size, target layers)."""


class NumericalError(DSparkError, RuntimeError):
    """A model produced NaN or infinite logits."""


class ConfigError(DSparkError, ValueError):
    """A setting, a parameter or a settings file is invalid, or conflicts with earlier work
    (a training run resumed with other settings)."""


class DataError(DSparkError, ValueError):
    """An input data file (prompts, training data, a trainer state) is malformed or unreadable."""


__all__ = ["BackendUnavailableError", "CheckpointError", "ConfigError", "DSparkError", "DataError",
           "DraftMismatchError", "NumericalError"]
