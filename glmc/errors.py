"""Errors users can act on: every failure glmc reports is a GlmcError with a message naming the culprit."""


class GlmcError(Exception):
    """A user-facing error: the message says what is wrong and where (file, key or tensor)."""


class ConfigError(GlmcError):
    """A configuration (config.json or compile YAML) is invalid."""


class CheckpointError(GlmcError):
    """A checkpoint directory or tensor file is missing, corrupt or does not match the config."""
