"""Generator families: the extension point for new models.

A family says how to load its pipeline from ``model.path``, which stages it can train (a policy constructor
each), which pipeline component each stage trains (the checkpoint mapping) and how its own pipeline turns
prompts into images (``tandem sample`` and ``tandem eval``). The trainer only ever calls
``get_family(cfg.model.family)``; a new family is one new adapter file that calls ``FAMILIES.register``.

Built-in families are imported on first lookup; installed packages can add families under the entry-point
group ``tandem.families`` (the entry point names a module that registers its family when imported).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from tandem.core.registry import Registry


@dataclass(frozen=True)
class ModelFamily:
    """One generator family.

    Attributes:
        name: the ``model.family`` value.
        load: ``load(model_cfg)`` -> the pipeline, on ``model_cfg.device`` in ``model_cfg.dtype``, frozen.
        policies: stage name -> ``policy(pipe, job_cfg)``; the stages this family can train.
        components: stage name -> the pipeline attribute that stage trains (checkpoints are keyed by it).
        generate: ``generate(pipe, prompts, job_cfg, seed)`` -> (N, H, W, 3) uint8 with the family's own
            pipeline at the eval settings.
        check_prompts: ``check_prompts(pipe, prompts, job_cfg, stage)`` raises ConfigError (one line) for a
            prompt the model cannot take (e.g. longer than its context), before anything runs; None = no limit.
    """

    name: str
    load: Callable[[Any], Any]
    policies: Dict[str, Callable[[Any, Any], Any]]
    components: Dict[str, str]
    generate: Callable[[Any, List[str], Any, int], np.ndarray]
    check_prompts: Optional[Callable[[Any, List[str], Any, str], None]] = None


FAMILIES: Registry[ModelFamily] = Registry("model family")
BUILTIN = {"glm_image": "tandem.policies.glm_image_family", "sd3": "tandem.policies.sd3"}


def get_family(name: str) -> ModelFamily:
    """The registered family ``name`` (``model.family``), importing a built-in or plug-in module on first use."""
    if name not in FAMILIES:
        module = BUILTIN.get(name) or next((ep.value for ep in entry_points(group="tandem.families") if ep.name == name), None)
        if module is not None:
            importlib.import_module(module)
    return FAMILIES.get(name, "model.family")


def family_names() -> List[str]:
    return sorted(set(BUILTIN) | set(FAMILIES.names()) | {ep.name for ep in entry_points(group="tandem.families")})


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES.register(family.name)(family)
    return family
