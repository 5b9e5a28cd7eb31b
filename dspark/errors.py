"""Errors that dspark raises for bad input. Each message says what is wrong and how to fix it.

The floor of the package: it imports nothing of dspark's own, so every layer can raise these.
The CLI prints a DSparkError (or a missing file) as one line and exits with status 2; any
other exception is a bug and keeps its traceback.
"""


class DSparkError(Exception):
    """Base class of dspark's own errors."""


class BackendUnavailableError(DSparkError, RuntimeError):
    """The requested backend cannot run here (package, toolkit or device missing)."""


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
