"""Shared pieces of the policies (the contract itself is ``tandem.core.protocols.Policy``)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tandem.core.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def trained_stages(stage: str) -> Tuple[str, ...]:
    """The policy stages a job of ``stage`` trains: "ar" and "decoder" themselves, "joint" both, any other
    command (``sample``, ``eval``) none."""
    return ("ar", "decoder") if stage == "joint" else (stage,) if stage in ("ar", "decoder") else ()


def edit_key(stage: str) -> str:
    """The config key that says whether ``stage`` edits images: ``decoder.edit`` for the decoder stage,
    ``ar.edit`` for the AR stage and for a joint job (whose two keys agree: ``ModelFamily.validate``)."""
    return "decoder.edit" if stage == "decoder" else "ar.edit"


def edits(cfg, stage: str) -> bool:
    """Whether a job's ``stage`` edits images (each record's ``reference`` image is the source to edit): the one
    answer that config validation, the prompt checks and the policies all read (``edit_key``)."""
    return bool(cfg.decoder.edit if edit_key(stage) == "decoder.edit" else cfg.ar.edit)


class TrainedComponent:
    """Mixin: the trained parameters are those of ``self.trained_module`` (a pipeline component, with any LoRA
    layers injected in place) that require grad — one naming for the optimizer, checkpoints and sampling."""

    trained_module: torch.nn.Module
    rollout_index: int = 0  # rollout batches this stage has done before the current one (``begin_rollout``)
    stage_step: int = 0  # optimizer steps this stage has taken before the current rollout batch (``begin_rollout``)
    # samples per forward inside a rollout call (None: the whole call), set by the trainer (tandem.rl.rollout_batch)
    rollout_chunk_size: Optional[int] = None
    inner_epoch: int = 0  # which of the grpo.num_iterations update epochs over the rollout batch runs (the trainer's)

    def begin_rollout(self, rollouts: int, steps: int) -> None:
        """Called by the trainer before each rollout batch (before its first ``rollout`` call) with this stage's
        rollout batches and optimizer steps so far (a joint job counts each stage apart; resume continues them)."""
        self.rollout_index, self.stage_step = rollouts, steps

    def prefetch(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                 first_copy: int = 0) -> None:
        """Called by the trainer before a rollout batch's ``rollout`` calls, with all their prompts, where the
        rollout's log-probs are recomputed: a policy may draw the whole batch in one pass here. None does by
        default."""

    def trainable_named_parameters(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.trained_module.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_named_parameters()}


def resolve_device(name: str) -> torch.device:
    """``model.device``: "auto" is the GPU if there is one, else the CPU. A GPU named without an index ("auto",
    "cuda") is this process's own: ``LOCAL_RANK`` (set by torchrun, accelerate and Ray Train) modulo the GPUs
    visible, so the processes of a data-parallel job on one host do not all land on GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is '{name}' but no GPU is visible to this process")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)
