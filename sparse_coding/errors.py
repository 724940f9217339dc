"""The errors a user sees as one line instead of a traceback: the message says what is wrong and what would be
right. The entry points catch `SparseCodingError`, print its message and exit 2; the subclass says what failed.
`ConfigError` and `DataError` are also ValueErrors, as every one of these errors was before they were told apart."""


class SparseCodingError(Exception):
    """Base of every error this package reports as one line."""


class ConfigError(SparseCodingError, ValueError):
    """A setting is invalid or contradicts another: a config value, an override, a command-line option, an argument."""


class DataError(SparseCodingError, ValueError):
    """What is read is missing, damaged or unusable: a cache, an input file, a checkpoint, a saved dictionary, rows."""


class StorageError(SparseCodingError):
    """Writing failed or cannot start: no space left, a folder that is not writable, a lock another process holds."""


class TrainingError(SparseCodingError):
    """Training ended without a usable measurement: no batch trained, auto-λ found nothing, metrics not finite."""


class NonFiniteError(TrainingError):
    """Training met NaN/Inf (data, loss, gradient or Phi): the run stops before Phi is updated with it."""


class RunInterrupted(SparseCodingError):
    """The run was stopped from outside (SIGTERM, Ctrl-C); its last checkpoint resumes it."""
