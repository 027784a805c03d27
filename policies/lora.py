"""LoRA settings (``optim.lora``) and their application through peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch


@dataclass
class LoraSettings:
    # Train a LoRA adapter (peft) instead of all weights; the reference is the adapter-disabled model.
    enabled: bool = False
    # LoRA rank.
    r: int = 16
    # LoRA alpha.
    alpha: int = 32
    # Module names (suffixes) that get adapters.
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


def apply_lora(model: torch.nn.Module, lora_cfg) -> torch.nn.Module:
    """Wrap ``model`` with a peft LoRA adapter on ``lora_cfg.target_modules`` (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, target_modules=list(lora_cfg.target_modules),
                        init_lora_weights="gaussian")
    return get_peft_model(model, config)
