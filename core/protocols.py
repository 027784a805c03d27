"""The contracts between the layers: what the one GRPO trainer needs from a policy (``Policy``).

A policy *acts*: it samples a batch with its current weights and stores what is needed to recompute the
log-probability of every action unit. The trainer never looks inside ``Rollout.extras``.

* ``rollout`` — no grad; returns a ``Rollout`` whose ``old_log_probs`` are those of the distribution that was
  actually sampled from (so the first on-policy ratio is exactly 1).
* ``unit_chunks`` — how the units of a minibatch are split into forward passes (the AR policy: one chunk of
  all tokens; the flow policy: one chunk per trained denoising step, so memory does not grow with steps).
* ``log_probs`` — with grad, the log-probs of one chunk under the current weights, and the per-unit KL to
  the reference when ``with_kl`` (LoRA adapter disabled, or a frozen copy when training all weights).
"""

from __future__ import annotations

from typing import Dict, List, Protocol, Sequence, Tuple

import numpy as np
import torch

from tandem.core.types import LogProbs, Rollout


class Policy(Protocol):
    stage: str  # "ar" | "decoder"

    def rollout(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int) -> Rollout:
        """Sample ``group_size`` copies of each prompt (copies adjacent). No grad."""

    def unit_chunks(self, batch: Rollout) -> List[slice]:
        """Slices over the U axis, one forward pass each."""

    def log_probs(self, batch: Rollout, chunk: slice, with_kl: bool) -> LogProbs:
        """(B, u) log-probs of ``batch``'s actions in ``chunk`` under the current weights (with grad)."""

    def trainable_named_parameters(self) -> List[Tuple[str, torch.nn.Parameter]]:
        """(name, parameter) pairs the optimizer updates, named as in the pipeline component."""

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """Parameters the optimizer updates."""

    def sample(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> np.ndarray:
        """(N, H, W, 3) uint8 images at eval settings (EMA weights where kept). No grad."""

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Trained weights to checkpoint (LoRA adapter or full), keyed like ``trainable_named_parameters``."""

    def on_optimizer_step(self) -> None:
        """Hook after each optimizer step (EMA update)."""
