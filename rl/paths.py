"""Paths in config files, and the files that ship inside the package.

**Relative paths in a config file resolve against the config file's folder**, for the keys that name inputs
(``CONFIG_PATH_KEYS``): ``configs/demo/decoder.yaml`` says ``data.prompts: ../../data/demo_prompts.jsonl``
and works from any working directory, and from the installed package. A path that is not found next to the
config is looked up in the working directory (so a folder the job creates, like the demo's tiny models,
lands there); a path found in both places, as two different files, is an error — write it absolute.
``output_dir`` and values given on the command line (``key=value``) are relative to the working directory.
The job config holds these keys as absolute paths, so a run's ``config.yaml`` reads the same from anywhere.

The example configs and prompt files ship as package data: ``tandem.configs`` and ``tandem.data``
(``shipped``).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tandem.core.errors import ConfigError

CONFIG_PATH_KEYS = ("model.path", "data.prompts", "data.eval_prompts", "decoder.buffer_dir", "resume")


def shipped(package: str, name: str) -> Path:
    """A file shipped in ``package`` (``tandem.data``, ``tandem.configs.demo``, ...)."""
    return Path(str(files(package).joinpath(name)))


def resolve_path(value: str, config_file: str, key: str) -> str:
    """``value`` of ``key`` in ``config_file``, resolved by the rule of the module docstring."""
    if os.path.isabs(value) or (key == "resume" and value == "auto"):
        return value
    beside = os.path.abspath(os.path.join(os.path.dirname(config_file), value))
    here = os.path.abspath(value)
    if os.path.exists(beside):
        if os.path.exists(here) and not os.path.samefile(beside, here):
            raise ConfigError(f"config key '{key}' ({config_file}): {value!r} names both {beside} (next to the config, "
                              f"which relative paths in a config mean) and {here} (in the working directory); "
                              f"write an absolute path")
        return beside
    return here


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """The path keys still relative (given on the command line) made absolute against the working directory."""
    for key in CONFIG_PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and not os.path.isabs(value) and not (key == "resume" and value == "auto"):
            OmegaConf.update(cfg, key, os.path.abspath(value))
    return cfg


def resolve_config_paths(file_cfg: DictConfig, config_file: str) -> DictConfig:
    """A copy of a config file's contents with its relative input paths resolved (``CONFIG_PATH_KEYS``)."""
    cfg = file_cfg.copy()
    for key in CONFIG_PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str):
            OmegaConf.update(cfg, key, resolve_path(value, config_file, key))
    return cfg
