"""Experiment trackers through accelerate (``logging.report_to``: tensorboard, wandb, ...).

The job's ``Accelerator`` is built with ``log_with=logging.report_to`` and its logging directory in the run
(``output_dir/tensorboard``); ``Trackers`` gives them, on the main process, the resolved config (flattened to
dotted keys: ``init_trackers(project_name, config)``), every optimizer step's numeric metrics
(``accelerator.log``) and each sample grid as an image (``log_images``, for the trackers that have it).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from omegaconf import OmegaConf

from tandem.core.errors import ConfigError
from tandem.rl.config import JobConfig

# tracker -> (accelerate's availability check in accelerate.utils, what to install)
REQUIREMENTS = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "comet_ml": ("is_comet_ml_available", "comet-ml"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "aim": ("is_aim_available", "'aim<4'"),
    "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "trackio": ("is_trackio_available", "trackio"),
}


def check_installed(report_to: Sequence[str]) -> None:
    """ConfigError naming the install command for the first tracker accelerate cannot use (accelerate drops an
    unavailable tracker without a word: the job would run with no tracker)."""
    import accelerate.utils

    for name in report_to:
        check, package = REQUIREMENTS[name]
        if not getattr(accelerate.utils, check)():
            raise ConfigError(f"config key 'logging.report_to' asks for {name}, which is not installed: "
                              f"pip install {package} (or remove {name} from logging.report_to)")


def flat_config(cfg: JobConfig) -> Dict[str, object]:
    """The config as dotted keys with scalar values (lists and dicts as their YAML text): what trackers take."""
    out: Dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, (int, float, str, bool)):
                out[name] = value
            else:  # None, lists (e.g. the reward entries)
                out[name] = str(value)

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return out


class Trackers:
    """The accelerate trackers of one job (none when ``logging.report_to`` is empty)."""

    def __init__(self, cfg: JobConfig, accelerator):
        self.accelerator, self.on = accelerator, bool(cfg.logging.report_to)
        if self.on:
            accelerator.init_trackers(cfg.logging.project_name, config=flat_config(cfg))

    def log(self, metrics: Dict, step: int) -> None:
        if self.on:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float, np.number))
                                  and not isinstance(v, bool)}, step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """``image``: (H, W, 3) uint8 (tensorboard is told so: its default layout is NCHW)."""
        for tracker in self.accelerator.trackers if self.on else ():
            if hasattr(tracker, "log_images"):
                extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
                tracker.log_images({name: image[None]}, step=step, **extra)

    def finish(self) -> None:
        """Close the trackers (not ``accelerator.end_training()``, which also tears the process group down with no
        barrier: the session ends that itself, ``tandem.rl.distributed.finish``)."""
        for tracker in self.accelerator.trackers if self.on else ():
            tracker.finish()
