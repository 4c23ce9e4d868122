"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero)."""


class GroupdirError(Exception):
    """Base of every error whose message is meant for the user, not a traceback."""


class ConfigError(GroupdirError, ValueError):
    """A config key or value that cannot be used; the message names the key."""


class DataError(GroupdirError, ValueError):
    """Bad input data; the message names the file, line and field."""


class GroupingError(GroupdirError, ValueError):
    """Labels that cannot be cut into the groups asked for."""


class TrainingError(GroupdirError, RuntimeError):
    """A run that cannot go on (a non-finite loss, an unusable validation metric)."""


class CheckpointError(GroupdirError, ValueError):
    """A checkpoint file that cannot be used here; the message names the file and the mismatch."""


class OutputError(GroupdirError, ValueError):
    """An output path the command could not write; the message names the path."""
