"""Checkpoints: save, resume, and load trained weights for sampling.

``checkpoints/step_N/`` holds, per trained stage (``ar`` and/or ``decoder``):
``<stage>.trained.safetensors`` (the policy's ``trainable_state_dict``: a LoRA adapter or the full module),
``<stage>.optimizer.pt`` (AdamW state keyed by parameter name, ``torch.distributed.checkpoint``'s full optimizer
state dict; only ever loaded with ``torch.load(weights_only=True)``), ``<stage>.ema.safetensors`` (when EMA is
on); and ``state.json``: step, rollout count, prompt-sampler positions, the per-prompt reward histories
(``grpo.per_prompt_stat_tracking``), the fp16 loss scaler's state, the global torch RNG state, the LoRA
settings and a fingerprint of the config that must match on resume. A folder appears complete or not at all
(written under a temporary name, then renamed).

The files are the same for ``distributed.strategy`` ddp and fsdp: with FSDP every process takes part in
``save_checkpoint`` (sharded weights, optimizer and EMA state are gathered whole) and the main process writes;
on resume every process reads the files and keeps its own shards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from tandem.rl.config import ConfigError, JobConfig
from tandem.core.dtensor import full_tensor, shard_like

# Keys that may change between a run and its resumption without changing what is trained.
_RESUMABLE_KEYS = ("output_dir", "max_steps", "resume", "logging", "reward_host")


def config_fingerprint(cfg: JobConfig) -> str:
    data = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _gathered(trainer):
    """(weights, optimizer state, EMA state or None) of one stage, whole tensors on the CPU (collective under FSDP)."""
    weights = {k: full_tensor(v).detach().contiguous().cpu() for k, v in trainer.policy.trainable_state_dict().items()}
    optimizer = get_optimizer_state_dict(trainer.policy.trained_module, _plain(trainer.optimizer),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema = getattr(trainer.policy, "ema", None)
    return weights, optimizer, None if ema is None else {k: v.contiguous().cpu() for k, v in ema.state_dict().items()}


def save_checkpoint(folder: Path, step: int, trainers: Dict[str, object], cfg: JobConfig, extra: Dict,
                    write: bool = True) -> Path:
    """Write ``folder/step_{step}``; ``trainers`` maps stage -> object with ``policy``, ``optimizer``.

    Under FSDP every process calls this (gathering the shards is collective) and only the one with ``write``
    writes."""
    out, tmp = folder / f"step_{step}", folder / f".step_{step}.partial"
    gathered = {stage: _gathered(t) for stage, t in trainers.items()}
    if not write:
        return out
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for stage, (weights, optimizer, ema) in gathered.items():
        save_file(weights, str(tmp / f"{stage}.trained.safetensors"))
        torch.save(optimizer, tmp / f"{stage}.optimizer.pt")
        if ema is not None:
            save_file(ema, str(tmp / f"{stage}.ema.safetensors"))
    lora = cfg.optim.lora
    state = {
        "step": step, "stages": sorted(trainers), "fingerprint": config_fingerprint(cfg),
        "lora": bool(lora.enabled), "lora_config": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules)},
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(), **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


STEP_FOLDER = re.compile(r"step_(\d+)")
STATE_KEYS = ("step", "stages", "fingerprint", "torch_rng", "run_state", "samplers")


def checkpoint_folders(run_dir: Path) -> List[Path]:
    """The run's checkpoints ``checkpoints/step_N`` with a state.json, by step; other folders (a user's
    ``step_2_backup``, a ``.step_N.partial`` left by a kill) are never taken for one."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_FOLDER.fullmatch(p.name).group(1)))


def find_resume_point(cfg: JobConfig) -> Optional[Path]:
    """The checkpoint folder ``cfg.resume`` names: "auto" -> the latest in the run (or None), else a path."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            raise ConfigError(f"resume: {cfg.resume} is not a checkpoint folder (expected state.json)")
        return path
    found = checkpoint_folders(Path(cfg.output_dir))
    return found[-1] if found else None


def saved_config_fingerprint(config_file: Path) -> Optional[str]:
    """The fingerprint of a run's ``config.yaml`` (None when it cannot be read as a job config)."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(config_file))
        return config_fingerprint(OmegaConf.to_object(saved))
    except Exception:  # any YAML or schema error: not this tandem's config, so not the same experiment
        return None


def read_state(path: Path, cfg: JobConfig) -> Dict:
    """state.json of a checkpoint, checked against ``cfg``; ConfigError (one line) when corrupt or foreign."""
    state = _state_json(path)
    if state.get("fingerprint") != config_fingerprint(cfg):
        raise ConfigError(f"resume: checkpoint {path} was written by a different config (only output_dir, max_steps, "
                          f"resume, logging and reward_host may change on resume); start a new output_dir instead")
    return state


def _state_json(folder: Path) -> Dict:
    """A checkpoint's state.json; ConfigError (one line) when it is corrupt or lacks a key."""
    file = folder / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"checkpoint {file} is corrupt ({type(e).__name__}); use an earlier checkpoint or "
                          f"remove {folder}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"checkpoint {file} lacks {', '.join(missing)}; use an earlier checkpoint or remove {folder}")
    return state


def _load(path: Path, loader):
    """``loader(path)`` with a truncated or corrupt file turned into one ConfigError line."""
    try:
        return loader(path)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} is missing; resume from another checkpoint or remove "
                          f"{path.parent}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}); resume from "
                          f"another checkpoint or remove {path.parent}") from None


def _safetensors(path: Path) -> Dict[str, torch.Tensor]:
    return _load(path, lambda p: load_file(str(p)))


def _copy_weights(named_parameters, weights: Dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved tensors into the parameters of the same names (no grad); unknown names are an error."""
    params = dict(named_parameters)
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise ConfigError(f"checkpoint {source}: weights do not match the model ({len(unknown)} unknown names, e.g. {unknown[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(shard_like(value, params[name]))


def restore(path: Path, trainers: Dict[str, object], state: Dict) -> None:
    """Load weights, optimizer, EMA and the RNG state of a checkpoint into the live trainers (every process
    reads the files; a sharded module keeps its own shards)."""
    for stage, t in trainers.items():
        _copy_weights(t.policy.trainable_named_parameters(), _safetensors(path / f"{stage}.trained.safetensors"), path)
        optimizer = _load(path / f"{stage}.optimizer.pt", lambda p: torch.load(p, weights_only=True))
        set_optimizer_state_dict(t.policy.trained_module, _plain(t.optimizer), optimizer,
                                 options=StateDictOptions(full_state_dict=True))
        ema_file = path / f"{stage}.ema.safetensors"
        if ema_file.is_file() and getattr(t.policy, "ema", None) is not None:
            t.policy.ema.load_state_dict(_safetensors(ema_file))
    rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)


def load_trained_weights(pipe, checkpoint: str, components: Dict[str, str]) -> None:
    """Load a checkpoint's trained weights into ``pipe``: stage -> pipeline attribute in ``components`` (the
    family's ``ModelFamily.components``)."""
    folder = Path(checkpoint)
    if not (folder / "state.json").is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: not a checkpoint folder (expected state.json)")
    meta = _state_json(folder)
    for stage in meta["stages"]:
        module = getattr(pipe, components[stage])
        weights = _safetensors(folder / f"{stage}.trained.safetensors")
        if meta["lora"]:  # re-inject the same adapters (module paths from the saved names), then load them
            from peft import LoraConfig, inject_adapter_in_model

            targets = sorted({k.split(".lora_")[0] for k in weights if ".lora_" in k})
            rank = next(v.shape[0] for k, v in weights.items() if ".lora_A" in k)
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=meta["lora_config"]["alpha"], target_modules=targets), module)
        _copy_weights(module.named_parameters(), weights, folder)
