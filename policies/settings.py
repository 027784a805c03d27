"""What a policy reads of a job: its own config section and a handful of shared values, nothing else.

As verl's workers get their own config section rather than the whole job's, a policy constructor takes a
``PolicySettings`` built once from the job config by ``PolicySettings.from_job`` (where the family's policy
constructors are called: ``tandem.rl.session.build_policy``). Config validation stays with the job config's owners
(families, token samplers, objectives): the settings carry only what acting and learning need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.policies.base import edits


@dataclass(frozen=True)
class PolicySettings:
    """The settings of one stage's policy.

    Attributes:
        stage: "ar" or "decoder".
        section: the stage's own config section (``ar`` or ``decoder``).
        height, width: the images' size in pixels (``data.height``, ``data.width``).
        edit: whether the stage edits images (``policies.base.edits``: ``ar.edit`` / ``decoder.edit``).
        lora: the LoRA settings (``optim.lora``; ``lora.enabled`` false = full fine-tuning).
        gradient_checkpointing: recompute activations in the backward (``optim.gradient_checkpointing``).
        dtype: the weights' dtype name (``model.dtype``).
        mixed_precision: the autocast mode (``optim.mixed_precision``).
        keeps_reference: whether a full fine-tune keeps a frozen reference copy for the KL term (``grpo.beta > 0``).
        old_decay_type: DiffusionNFT's old-policy decay schedule (``grpo.nft_old_decay_type``; 0 = no old policy).
        compile_decoder: regional compilation of the decoder's repeated blocks (``decoder.compile``; for the AR
            stage the frozen decoder that renders its tokens).
    """

    stage: str
    section: Any
    height: int
    width: int
    edit: bool
    lora: Any
    gradient_checkpointing: bool
    dtype: str
    mixed_precision: str
    keeps_reference: bool
    old_decay_type: int
    compile_decoder: bool

    @classmethod
    def from_job(cls, cfg: Any, stage: str) -> "PolicySettings":
        """The settings of ``stage``'s policy (ar | decoder) from the job config ``cfg``: the one place they are read."""
        return cls(stage=stage, section=cfg.ar if stage == "ar" else cfg.decoder, height=cfg.data.height,
                   width=cfg.data.width, edit=edits(cfg, stage), lora=cfg.optim.lora,
                   gradient_checkpointing=bool(cfg.optim.gradient_checkpointing), dtype=cfg.model.dtype,
                   mixed_precision=cfg.optim.mixed_precision, keeps_reference=cfg.grpo.beta > 0,
                   old_decay_type=cfg.grpo.nft_old_decay_type, compile_decoder=bool(cfg.decoder.compile))
