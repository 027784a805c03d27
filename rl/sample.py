"""``tandem sample``: prompts -> images through the family's own pipeline (its ``generate``: for a two-stage family,
text -> AR tokens -> decoder -> pixels), optionally with a checkpoint's trained weights."""

from __future__ import annotations

from typing import Optional

from tandem.core.data import load_prompts
from tandem.core.errors import ConfigError
from tandem.policies.families import get_family
from tandem.rl.config import JobConfig
from tandem.rl.run_dir import RunDir


def load_for_sampling(cfg: JobConfig, checkpoint: Optional[str] = None, ema: bool = False):
    """(family, pipeline) of ``cfg.model``, with ``checkpoint``'s trained weights (its EMA weights with ``ema``)
    loaded when given."""
    family = get_family(cfg.model.family)
    if ema and not checkpoint:
        raise ConfigError("--ema needs --checkpoint (the EMA weights are a checkpoint's)")
    pipe = family.load(cfg.model)
    if checkpoint:
        from tandem.rl.checkpoint import load_trained_weights

        load_trained_weights(pipe, checkpoint, family.components, ema=ema)
    return family, pipe


def run_sample(cfg: JobConfig, num_prompts: Optional[int] = None, checkpoint: Optional[str] = None,
               ema: bool = False) -> str:
    records = load_prompts(cfg.data.prompts, (cfg.data.height, cfg.data.width), cfg.data.allowed_roots)[: num_prompts or None]
    family, pipe = load_for_sampling(cfg, checkpoint, ema)
    run = RunDir(cfg.output_dir).create(cfg)
    prompts = [r.prompt for r in records]
    images = family.generate(pipe, prompts, cfg, cfg.seed)
    return str(run.save_grid("sample", images, prompts))
