"""LoRA settings (``optim.lora``), their application through peft, and exact merging for fast rollouts."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List

import torch
from torch.utils.weak import WeakIdKeyDictionary


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


class MergedLoRA:
    """Run a peft LoRA model with every active adapter merged into its base weight, and restore it exactly after.

    Inside ``with merged(model):`` each LoRA linear computes x·(W + ΔW)ᵀ through its base layer alone, ΔW = (α/r)·B·A
    (peft's ``get_delta_weight``; the sum rounded once to W's dtype), with the adapters switched off: one matmul
    per projection instead of three, which is what a memory-bound decode step pays for (peft's ``merge_adapter``,
    made exact on the way back). On exit every merged weight gets its saved bits back — subtracting ΔW again in
    bf16 would not restore them — so the training forward and the adapter-disabled reference are untouched, also
    after an exception. The saved copies are kept for the next call: memory of the size of the targeted weights,
    shared by every ``MergedLoRA`` (a joint job's decoder rollout and its AR stage's render, which never run at
    once, merge the same DiT with one copy). A model without active, unmerged LoRA layers runs as it is, and so do
    sharded (FSDP) weights; so does every model while ``enabled`` is false.
    """

    _saved = WeakIdKeyDictionary()  # base weight -> its saved copy, for every instance

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @staticmethod
    def layers(model: torch.nn.Module) -> list:
        """The LoRA linears of ``model`` whose adapters take part in its forward now."""
        from peft.tuners.lora import LoraLayer

        from torch.distributed.tensor import DTensor

        return [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged
                and any(a in m.lora_A for a in m.active_adapters)
                and not isinstance(m.get_base_layer().weight, DTensor)]

    @contextmanager
    def __call__(self, model: torch.nn.Module):
        layers = self.layers(model) if self.enabled else []
        done = []
        try:
            with torch.no_grad():
                for layer in layers:
                    weight = layer.get_base_layer().weight
                    saved = self._saved.get(weight)
                    if saved is None or saved.shape != weight.shape or saved.device != weight.device:
                        saved = self._saved[weight] = torch.empty_like(weight)
                    saved.copy_(weight)
                    done.append((layer, weight, saved))
                    delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                    weight.copy_(weight.float() + delta.float())
                    layer.enable_adapters(False)
            yield
        finally:
            with torch.no_grad():
                for layer, weight, saved in done:
                    weight.copy_(saved)
                    layer.enable_adapters(True)
