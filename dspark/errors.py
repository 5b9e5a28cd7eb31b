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


__all__ = ["BackendUnavailableError", "CheckpointError", "DSparkError", "DraftMismatchError", "NumericalError"]
