"""Errors that reach the user as one clear message (no traceback). Torch-free; every package uses these."""


class UserError(Exception):
    """Bad input from the user (a file, an argument, a config): the message names the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint cannot be read, or does not fit the model."""


class ConfigError(UserError):
    """A config file or override is invalid or not supported."""
