"""``tandem export CHECKPOINT OUT``: a complete pipeline folder with a checkpoint's trained weights merged in.

The pipeline is the run's own (``RUN/config.yaml``: ``model.family``, ``model.path``), or that of ``--config``;
LoRA adapters are merged into the base weights (``merge_and_unload``) and the pipeline is written with its
``save_pretrained``, so the family's plain loader (its pipeline class's ``from_pretrained(OUT)``) reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tandem.core.errors import ConfigError
from tandem.rl.checkpoint import checkpoint_folders
from tandem.rl.config import load_config
from tandem.rl.sample import load_for_sampling


def check_checkpoint(checkpoint: str) -> None:
    """``checkpoint`` must be a checkpoint folder (with state.json); a run folder, a run's ``checkpoints/`` or a
    missing step is one ConfigError naming the checkpoints the run does have."""
    path = Path(checkpoint)
    if (path / "state.json").is_file():
        return
    run = next((r for r in (path, path.parent, path.parent.parent) if (r / "config.yaml").is_file()), None)
    found = [str(f) for f in checkpoint_folders(run)] if run is not None else []
    offer = (f"; the run's checkpoints: {', '.join(found[-3:])}" if found else
             f"; the run {run} holds no checkpoint yet (logging.checkpoint_every)" if run is not None else
             "; give a checkpoint folder of a run, RUN/checkpoints/step_N")
    if run is not None and run == path:
        raise ConfigError(f"export: {checkpoint} is a run folder, not a checkpoint{offer}")
    what = "does not exist" if not path.exists() else "is not a checkpoint folder (no state.json)"
    raise ConfigError(f"export: {checkpoint} {what}{offer}")


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
    check_checkpoint(checkpoint)
    cfg = load_config(config or run_config(checkpoint), list(overrides), stage="sample")
    _, pipe = load_for_sampling(cfg, checkpoint, ema)
    pipe.save_pretrained(str(target), safe_serialization=True)
    return target
