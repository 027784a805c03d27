"""``tandem export CHECKPOINT OUT``: a complete pipeline folder with a checkpoint's trained weights merged in.

The pipeline is the run's own (``RUN/config.yaml``: ``model.family``, ``model.path``), or that of ``--config``;
LoRA adapters are merged into the base weights (``merge_and_unload``) and the pipeline is written with its
``save_pretrained``, so the family's plain loader (its pipeline class's ``from_pretrained(OUT)``) reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tandem.core.errors import ConfigError
from tandem.rl.config import load_config
from tandem.rl.sample import load_for_sampling


def run_config(checkpoint: str) -> str:
    """The ``config.yaml`` of the run a checkpoint folder (``RUN/checkpoints/step_N``) belongs to."""
    path = Path(checkpoint).resolve().parents[1] / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"export: no config.yaml in the run of {checkpoint} (expected {path}); pass --config FILE")
    return str(path)


def export_pipeline(checkpoint: str, out: str, ema: bool = False, config: Optional[str] = None,
                    overrides=()) -> Path:
    """Write the merged pipeline to ``out`` (which must not exist yet); returns it."""
    target = Path(out)
    if target.exists():
        raise ConfigError(f"export: {out} already exists; choose a new folder")
    cfg = load_config(config or run_config(checkpoint), list(overrides), stage="sample")
    _, pipe = load_for_sampling(cfg, checkpoint, ema)
    pipe.save_pretrained(str(target), safe_serialization=True)
    return target
