"""Checkpoints: save, resume, and load trained weights for sampling and export.

The trainer owns what a checkpoint holds (``StageTrainer.state_dict`` / ``load_state_dict``); this module owns
the files. ``checkpoints/step_N/`` holds, per trained stage (``ar`` and/or ``decoder``), under the name of the
pipeline component it trains (the family's ``components``, e.g. ``transformer/``, ``vision_language_encoder/``):

* ``<component>/`` — the trained weights in the libraries' own formats (``tandem.rl.weights``): a LoRA adapter
  that diffusers' ``load_lora_adapter`` or peft's ``PeftModel.from_pretrained`` loads, or a ``save_pretrained``
  folder of the fully fine-tuned component;
* ``ema/<component>/`` — the EMA of the trained weights (when ``decoder.ema_decay`` > 0), same format;
* ``<stage>.optimizer.pt`` — AdamW state keyed by parameter name (``torch.distributed.checkpoint``'s full
  optimizer state dict; only ever loaded with ``torch.load(weights_only=True)``);
* ``<stage>.extra_state.safetensors`` — what a policy keeps besides its weights (``policy.extra_state()``, e.g.
  DiffusionNFT's old policy with ``grpo.nft_old_decay_type``), when it keeps anything;
* ``<stage>.handoff.safetensors`` — the stage's latest hand-off (the AR stage's prompts with their token grids),
  which a joint job's next decoder phase trains on (``tandem.rl.buffer.save_records``);
* ``state.json`` — step, rollout count, prompt-sampler positions, LR-scheduler states, EMA step counts, the
  per-prompt reward histories (``grpo.per_prompt_stat_tracking``), the fp16 loss scaler's state, the global
  torch RNG state, the components, and a fingerprint of the config that must match on resume.

Resume reads the same folders back: there is one copy of the weights. A folder appears complete or not at all
(written under a temporary name, then renamed); ``logging.save_total_limit`` keeps only the newest N. A write
that fails (disk full, quota, I/O error) removes the partial folder and raises CheckpointError naming the file
and the cause, so the previous checkpoint stays the one ``resume=auto`` takes.

The files are the same for ``distributed.strategy`` ddp and fsdp: with FSDP every process takes part in
``save_checkpoint`` (sharded weights, optimizer and EMA state are gathered whole) and the main process writes;
on resume every process reads the files and keeps its own shards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from tandem.core.errors import RunError
from tandem.policies.families import get_family
from tandem.rl.buffer import load_records, save_records
from tandem.rl.config import ConfigError, JobConfig
from tandem.rl.weights import checked_load, load_file, load_merged, read_weights, trained_folder, write_weights

# Keys that may change between a run and its resumption without changing what is trained.
_RESUMABLE_KEYS = ("output_dir", "max_steps", "resume", "logging", "reward_host")


def config_fingerprint(cfg: JobConfig) -> str:
    data = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, step: int, trainers: Dict[str, object], cfg: JobConfig, extra: Dict,
                    write: bool = True) -> Path:
    """Write ``folder/step_{step}``: the files of what each stage's ``StageTrainer.state_dict()`` gives, and
    ``extra`` (the run's own state: ``run_state``, ``grad_scaler``, ``metrics``) in state.json.

    Under FSDP every process calls this (gathering the shards is collective) and only the one with ``write``
    writes."""
    out, tmp = folder / f"step_{step}", folder / f".step_{step}.partial"
    lora, components = bool(cfg.optim.lora.enabled), get_family(cfg.model.family).components
    parts = {stage: t.state_dict() for stage, t in trainers.items()}  # collective under FSDP
    if not write:
        return out
    shutil.rmtree(tmp, ignore_errors=True)
    _written(out, tmp, ".", lambda path: path.mkdir(parents=True))
    for stage, part in parts.items():
        module, component = trainers[stage].policy.trained_module, components[stage]
        _written(out, tmp, component, lambda path: write_weights(path, module, component, part["weights"], lora))
        _written(out, tmp, f"{stage}.optimizer.pt", lambda path: torch.save(part["optimizer"], path))
        if part["handoff"]:
            _written(out, tmp, f"{stage}.handoff.safetensors", lambda path: save_records(path, part["handoff"]))
        if part["ema"] is not None:
            _written(out, tmp, f"ema/{component}",
                     lambda path: write_weights(path, module, component, part["ema"], lora))
        if part["extra_state"]:
            _written(out, tmp, f"{stage}.extra_state.safetensors",
                     lambda path: save_file(part["extra_state"], str(path)))
    state = {
        "step": step, "stages": sorted(trainers), "fingerprint": config_fingerprint(cfg), "lora": lora,
        "components": {stage: components[stage] for stage in trainers},
        "schedulers": {stage: p["scheduler"] for stage, p in parts.items()},
        "samplers": {stage: p["sampler"] for stage, p in parts.items()},
        "stat_trackers": {stage: p["stat_tracker"] for stage, p in parts.items() if p["stat_tracker"] is not None},
        "ema_steps": {stage: p["ema_steps"] for stage, p in parts.items() if p["ema_steps"] is not None},
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(), **extra,
    }
    _written(out, tmp, "state.json", lambda path: path.write_text(json.dumps(state, indent=1)))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _prune(folder, cfg.logging.save_total_limit)
    return out


class CheckpointError(RunError):
    """A checkpoint could not be written (its partial folder is removed); the CLI prints it as one line."""


# What a write that fails for a cause outside tandem raises: the OS, torch.save's zip writer, safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _written(out: Path, tmp: Path, name: str, write) -> None:
    """``write(tmp / name)``; a failed write removes ``tmp`` and raises CheckpointError naming ``out / name``, the
    cause and the space left on that filesystem (torch.save's own message names neither the file nor the cause)."""
    try:
        write(tmp / name)
    except WRITE_ERRORS as e:
        cause = (e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0])
        if "inline_container" in cause:  # torch.save's zip writer: "[enforce fail at inline_container.cc:672] ..."
            cause = "torch.save's zip writer could not write all of it"
        try:
            free = f"{shutil.disk_usage(tmp.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {out}: writing {out / name if name != '.' else out} failed "
                              f"({type(e).__name__}: {cause}; {free}); the partial checkpoint was removed: free "
                              "space (or move output_dir to a larger disk) and continue with resume=auto") from None


STEP_FOLDER = re.compile(r"step_(\d+)")
STATE_KEYS = ("step", "stages", "fingerprint", "torch_rng", "run_state", "samplers", "components", "schedulers")


def checkpoint_folders(run_dir: Path) -> List[Path]:
    """The run's checkpoints ``checkpoints/step_N`` with a state.json, by step; other folders (a user's
    ``step_2_backup``, a ``.step_N.partial`` left by a kill) are never taken for one."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_FOLDER.fullmatch(p.name).group(1)))


def _prune(folder: Path, limit: Optional[int]) -> None:
    """``logging.save_total_limit``: delete all but the newest ``limit`` checkpoints of the run (``folder`` is its
    ``checkpoints/``)."""
    if limit:
        for old in checkpoint_folders(folder.parent)[:-limit]:
            shutil.rmtree(old)


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
    """A checkpoint's state.json; ConfigError (one line) when it is corrupt, lacks a key, or is of the layout
    before the standard weight folders."""
    file = folder / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"checkpoint {file} is corrupt ({type(e).__name__}); use an earlier checkpoint or "
                          f"remove {folder}") from None
    if isinstance(state, dict) and "stages" in state and "components" not in state:
        raise ConfigError(f"checkpoint {folder} was written by an older tandem (<stage>.trained.safetensors); use it "
                          f"with that version, or start a new output_dir")
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"checkpoint {file} lacks {', '.join(missing)}; use an earlier checkpoint or remove {folder}")
    return state


def restore(path: Path, trainers: Dict[str, object], state: Dict) -> None:
    """Read each stage's files of checkpoint ``path`` back into what ``StageTrainer.state_dict()`` gave and load
    it into the live trainer (``load_state_dict``; every process reads the files and keeps its own shards); then
    the global RNG state. ``state`` is the checkpoint's state.json (``read_state``)."""
    for stage, t in trainers.items():
        component = state["components"][stage]
        ema_folder = trained_folder(path, component, ema=True)
        extra_file, handoff_file = path / f"{stage}.extra_state.safetensors", path / f"{stage}.handoff.safetensors"
        t.load_state_dict({
            "weights": read_weights(path / component, component),
            "optimizer": checked_load(path / f"{stage}.optimizer.pt", lambda p: torch.load(p, weights_only=True)),
            "ema": None if ema_folder is None else read_weights(ema_folder, component),
            "ema_steps": state.get("ema_steps", {}).get(stage, 0),
            "extra_state": load_file(str(extra_file)) if extra_file.is_file() else {},
            "handoff": load_records(handoff_file) if handoff_file.is_file() else [],
            "scheduler": state["schedulers"][stage], "sampler": state["samplers"][stage],
            "stat_tracker": state.get("stat_trackers", {}).get(stage),
        }, path)
    rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)


def load_trained_weights(pipe, checkpoint: str, components: Dict[str, str], ema: bool = False) -> None:
    """Load a checkpoint's trained weights into ``pipe`` (LoRA adapters merged): stage -> pipeline attribute in
    ``components`` (the family's ``ModelFamily.components``). With ``ema``, the EMA weights of the stages that
    kept one (``--ema``)."""
    folder = Path(checkpoint)
    if not (folder / "state.json").is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: not a checkpoint folder (expected state.json)")
    stages = _state_json(folder)["stages"]
    with_ema = {s for s in stages if trained_folder(folder, components[s], ema=True) is not None}
    if ema and not with_ema:
        raise ConfigError(f"--ema: checkpoint {checkpoint} holds no EMA weights (the run had decoder.ema_decay 0); "
                          f"drop --ema")
    for stage in stages:
        component = components[stage]
        source = trained_folder(folder, component, ema=ema and stage in with_ema)
        if source is None:
            raise ConfigError(f"--checkpoint {checkpoint}: no {component}/ folder (a checkpoint of an older tandem?)")
        setattr(pipe, component, load_merged(getattr(pipe, component), source, component))
