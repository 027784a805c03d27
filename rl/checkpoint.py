"""Checkpoints: trained weights as safetensors, plus the optimizer state and the step.

Layout of ``checkpoints/step_N/``: ``trained.safetensors`` (the policy's ``trainable_state_dict``: a LoRA
adapter or the full trained module), ``optimizer.pt`` (loaded back only with ``weights_only=True``) and
``state.json`` (stage, step, prompt-sampler position, whether the weights are LoRA).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

from rl.config import ConfigError

STAGE_MODULES = {"decoder": "transformer", "ar": "vision_language_encoder"}


def save_checkpoint(folder: Path, policy, optimizer, step: int, extra: Dict) -> Path:
    out = folder / f"step_{step}"
    tmp = folder / f".step_{step}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in policy.trainable_state_dict().items()}
    save_file(state, str(tmp / "trained.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    lora = policy.cfg.optim.lora
    meta = {"stage": policy.stage, "step": step, "lora": bool(lora.enabled), **extra,
            "lora_config": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out


def load_trained_weights(pipe, checkpoint: str) -> None:
    """Load a checkpoint's trained weights into the matching component of a ``GlmImagePipeline``."""
    folder = Path(checkpoint)
    if not (folder / "state.json").is_file() or not (folder / "trained.safetensors").is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: not a checkpoint folder (expected state.json and trained.safetensors)")
    meta = json.loads((folder / "state.json").read_text())
    module = getattr(pipe, STAGE_MODULES[meta["stage"]])
    weights = load_file(str(folder / "trained.safetensors"))
    if meta["lora"]:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        lc = meta["lora_config"]
        peft_model = get_peft_model(module, LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], target_modules=lc["target_modules"]))
        set_peft_model_state_dict(peft_model, weights)
        setattr(pipe, STAGE_MODULES[meta["stage"]], peft_model.merge_and_unload())
    else:
        _, unexpected = module.load_state_dict(weights, strict=False)
        if unexpected:
            raise ConfigError(f"--checkpoint {checkpoint}: weights do not match the model ({len(unexpected)} unexpected keys)")
