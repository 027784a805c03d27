"""Trained weights of one pipeline component in the libraries' own folder formats.

A checkpoint writes each trained component (the family's ``components[stage]``, e.g. ``transformer``) to a
folder the plain libraries load, and reads the same folder back on resume (one copy of the weights):

* **LoRA, diffusers model** (``diffusers.ModelMixin``): ``pytorch_lora_weights.safetensors`` as a diffusers
  pipeline's ``save_lora_weights`` writes it — keys ``<component>.<module>.lora_A.weight``, and the adapter's
  ``LoraConfig`` (r, lora_alpha, target_modules, ...) under the safetensors metadata key
  ``lora_adapter_metadata``, prefixed the same way. ``model.load_lora_adapter(folder, use_safetensors=True)``
  (``PeftAdapterMixin``) then rebuilds the adapter with the trained alpha; without that metadata diffusers
  would assume alpha = r.
* **LoRA, transformers model**: peft's ``PeftModel.save_pretrained`` layout — ``adapter_config.json`` and
  ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight``;
  ``PeftModel.from_pretrained(model, folder)`` loads it.
* **Full fine-tuning**: the component's ``save_pretrained`` folder (``from_pretrained`` loads it). Under FSDP
  the gathered whole tensors are written: transformers through ``save_pretrained(state_dict=...)``; diffusers
  (whose ``save_pretrained`` takes no state dict) as its config plus one ``diffusion_pytorch_model.safetensors``.

Live LoRA parameters are named ``<module>.lora_A.default.weight`` (peft's adapter name ``default``); the files
drop the adapter name, as peft and diffusers do.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as _load_file, save_file

from tandem.core.errors import ConfigError

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
PEFT_LORA = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
ADAPTER = "default"
_LIVE = re.compile(r"\.(lora_[A-Za-z_]+)\." + ADAPTER + r"(?=\.|$)")
_SAVED = re.compile(r"\.(lora_[A-Za-z_]+)(?=\.|$)")


def checked_load(path: Path, loader):
    """``loader(path)`` with a missing, truncated or corrupt checkpoint file turned into one ConfigError line."""
    try:
        return loader(path)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} is missing; resume from another checkpoint or remove "
                          f"{path.parent}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}); resume from "
                          f"another checkpoint or remove {path.parent}") from None


def load_file(path: str) -> Dict[str, torch.Tensor]:
    """safetensors' ``load_file`` with ``checked_load``'s one-line errors."""
    return checked_load(Path(path), lambda p: _load_file(str(p)))


def saved_name(param_name: str) -> str:
    """``x.lora_A.default.weight`` -> ``x.lora_A.weight`` (the adapter name dropped, as in the files)."""
    return _LIVE.sub(r".\1", param_name)


def live_name(key: str) -> str:
    """Inverse of ``saved_name``."""
    return _SAVED.sub(r".\1." + ADAPTER, key)


def _is_diffusers(module: torch.nn.Module) -> bool:
    from diffusers import ModelMixin

    return isinstance(module, ModelMixin)


def write_weights(folder: Path, module: torch.nn.Module, component: str, weights: Dict[str, torch.Tensor],
                  lora: bool) -> None:
    """Write ``weights`` of ``module`` (pipeline attribute ``component``) to ``folder`` (module docstring).

    ``weights``: the LoRA parameters by live name (``lora``), or the whole module's state dict (full)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    if lora:
        config = module.peft_config[ADAPTER]
        if _is_diffusers(module):
            meta = {f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
            save_file({f"{component}.{saved_name(k)}": v for k, v in weights.items()}, str(folder / DIFFUSERS_LORA),
                      metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True, default=str)})
        else:
            config.save_pretrained(str(folder))
            save_file({PEFT_PREFIX + saved_name(k): v for k, v in weights.items()}, str(folder / PEFT_LORA),
                      metadata={"format": "pt"})
    elif _is_diffusers(module):
        module.save_config(str(folder))
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    else:
        module.save_pretrained(str(folder), state_dict=weights, safe_serialization=True)


def is_lora_folder(folder: Path) -> bool:
    return (folder / DIFFUSERS_LORA).is_file() or (folder / PEFT_LORA).is_file()


def read_weights(folder: Path, component: str) -> Dict[str, torch.Tensor]:
    """Tensors of a folder written by ``write_weights``, by the live parameter names of the module."""
    if (folder / DIFFUSERS_LORA).is_file():
        prefix = f"{component}."
        return {live_name(k[len(prefix):]): v for k, v in load_file(str(folder / DIFFUSERS_LORA)).items()
                if k.startswith(prefix)}
    if (folder / PEFT_LORA).is_file():
        return {live_name(k[len(PEFT_PREFIX):]): v for k, v in load_file(str(folder / PEFT_LORA)).items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"checkpoint folder {folder}: no weights (*.safetensors) found")
    weights: Dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def lora_config(folder: Path, component: str):
    """The ``peft.LoraConfig`` saved in a LoRA folder, or None for a full-weights folder."""
    from dataclasses import fields

    from peft import LoraConfig

    if (folder / PEFT_CONFIG).is_file():
        return LoraConfig.from_pretrained(str(folder))
    if not (folder / DIFFUSERS_LORA).is_file():
        return None
    def metadata(path: Path):
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[METADATA_KEY])

    meta = checked_load(folder / DIFFUSERS_LORA, metadata)
    names, prefix = {f.name for f in fields(LoraConfig)}, f"{component}."
    return LoraConfig(**{k[len(prefix):]: v for k, v in meta.items()
                         if k.startswith(prefix) and k[len(prefix):] in names})


def copy_into(named_parameters, weights: Dict[str, torch.Tensor], source: Path, shard_like=None) -> None:
    """Copy ``weights`` into the parameters of the same names (no grad); a name the module lacks is an error.
    ``shard_like(value, param)`` lays a whole tensor out like a sharded parameter (FSDP)."""
    params = dict(named_parameters)
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise ConfigError(f"checkpoint {source}: weights do not match the model ({len(unknown)} unknown names, "
                          f"e.g. {unknown[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value if shard_like is None else shard_like(value, params[name]))


def load_merged(module: torch.nn.Module, folder: Path, component: str) -> torch.nn.Module:
    """``module`` with the weights of ``folder``: full weights copied in, or a LoRA adapter injected, loaded and
    merged into the base weights (``merge_and_unload``). Returns the module to use (the same object)."""
    config = lora_config(folder, component)
    weights = read_weights(folder, component)
    if config is None:  # parameters and persistent buffers, as save_pretrained wrote them
        copy_into(module.state_dict(keep_vars=True).items(), weights, folder)
        return module
    from peft import get_peft_model

    peft_model = get_peft_model(module, config)
    copy_into(module.named_parameters(), weights, folder)
    return peft_model.merge_and_unload()


def trained_folder(checkpoint: Path, component: str, ema: bool = False) -> Optional[Path]:
    """Where a checkpoint keeps ``component``'s trained (or EMA) weights; None when it has none."""
    folder = checkpoint / "ema" / component if ema else checkpoint / component
    return folder if folder.is_dir() else None
