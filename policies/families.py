"""Generator families: the extension point for new models.

A family says how to load its pipeline from ``model.path``, which stages it can train (a policy constructor
each), which pipeline component each stage trains (the checkpoint mapping) and how its own pipeline turns
prompts into images (``tandem sample`` and ``tandem eval``). The trainer only ever calls
``get_family(cfg.model.family)``; a new family is one new adapter file that calls ``FAMILIES.register``.

A family owns its config rules: ``validate(cfg, stage)`` checks, when the config loads, that the family trains the
job's stages and edits images only in the stages it declares (``edits``), then runs the family's own ``rules``.

Built-in families are imported on first lookup; installed packages can add families under the entry-point
group ``tandem.families`` (the entry point names a module that registers its family when imported).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from tandem.core.errors import require
from tandem.core.registry import Registry
from tandem.policies.base import edit_key, edits, trained_stages


@dataclass(frozen=True)
class ModelFamily:
    """One generator family.

    Attributes:
        name: the ``model.family`` value.
        load: ``load(model_cfg)`` -> the pipeline, on ``model_cfg.device`` in ``model_cfg.dtype``, frozen.
        policies: stage name -> ``policy(pipe, settings)``, ``settings`` the stage's ``PolicySettings``
            (``policies.settings``: its own config section and the few shared values it reads, never the job
            config); the stages this family can train.
        components: stage name -> the pipeline attribute that stage trains (checkpoints are keyed by it).
        generate: ``generate(pipe, prompts, job_cfg, seed)`` -> (N, H, W, 3) uint8 with the family's own
            pipeline at the eval settings.
        check_prompts: ``check_prompts(pipe, prompts, job_cfg, stage)`` raises ConfigError (one line) for a
            prompt the model cannot take (e.g. longer than its context), before anything runs; None = no limit.
        edits: the stages that can edit images (``ar.edit`` / ``decoder.edit``: each record's ``reference`` image
            is the source to edit); () = none.
        rules: ``rules(cfg, stage)`` raises ConfigError (one line) for settings of the job config the family
            cannot run (its own keys and combinations), after the generic checks of ``validate``; None = none.
    """

    name: str
    load: Callable[[Any], Any]
    policies: Dict[str, Callable[[Any, Any], Any]]
    components: Dict[str, str]
    generate: Callable[[Any, List[str], Any, int], np.ndarray]
    check_prompts: Optional[Callable[[Any, List[str], Any, str], None]] = None
    edits: Tuple[str, ...] = ()
    rules: Optional[Callable[[Any, str], None]] = None

    def validate(self, cfg: Any, stage: str) -> None:
        """The family's rules for a job of ``stage`` (ar | decoder | joint | sample): it has a policy for every
        stage the job trains, edits only in ``edits``, and a joint job edits in both stages or in neither (its
        AR phase writes the target's tokens that its decoder phase paints over the same source); then ``rules``."""
        for phase in trained_stages(stage):
            require(phase in self.policies, "model.family", f"{self.name!r} has no {phase} stage (it trains: "
                    f"{', '.join(self.policies)})")
            require(not edits(cfg, phase) or phase in self.edits, edit_key(phase), f"model.family {self.name!r} "
                    f"cannot edit images in the {phase} stage (it edits in: {', '.join(self.edits) or 'none'})")
        if stage == "joint":
            require(not edits(cfg, "ar") or edits(cfg, "decoder"), "decoder.edit", "a joint job with ar.edit edits "
                    "in both stages: set decoder.edit=true (or ar.edit=false)")
            require(edits(cfg, "ar") or not edits(cfg, "decoder"), "ar.edit", "a joint job with decoder.edit edits "
                    "in both stages: set ar.edit=true (or decoder.edit=false)")
        if self.rules is not None:
            self.rules(cfg, stage)


FAMILIES: Registry[ModelFamily] = Registry("model family")
BUILTIN = {"glm_image": "tandem.policies.glm_image_family", "sd3": "tandem.policies.sd3"}
DEFAULT_FAMILY = "glm_image"


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
