"""Errors every layer raises; the CLI prints their message as one line."""


class ConfigError(ValueError):
    """A user mistake in a config or an input file: the CLI prints its message as one line and exits 2."""
