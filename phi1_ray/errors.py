"""Exceptions whose message is meant for the user: jobs print them as one line, without a traceback."""


class Phi1Error(Exception):
    """Base of every user-facing phi1_ray error."""


class ConfigError(Phi1Error, ValueError):
    """A config file, key or value is invalid."""


class CheckpointError(Phi1Error):
    """A checkpoint directory is missing, incomplete, corrupt or does not match its config."""


class GenerationError(Phi1Error, ValueError):
    """A generation request cannot be served as asked (for example a prompt longer than the context)."""


class DataError(Phi1Error):
    """A corpus source is missing, or (in strict mode) a line of it is bad."""


class StorageError(Phi1Error):
    """A path or URI cannot be listed, read or written (unknown scheme, missing files, no access)."""
