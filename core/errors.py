"""Errors every layer raises; the CLI prints their message as one line."""


class ConfigError(ValueError):
    """A user mistake in a config or an input file: the CLI prints its message as one line and exits 2."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("config key 'KEY': MESSAGE")`` unless ``ok``: the one-line form of every config rule,
    whichever object owns it (the job config, a model family, a token sampler, an objective)."""
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


class RunError(RuntimeError):
    """A job that cannot go on for a cause outside its config (the disk filled while a checkpoint was written):
    the CLI prints its message as one line and exits 1."""
