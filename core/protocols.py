"""The contracts between the layers: what the one GRPO trainer needs from a policy (``Policy``).

A policy *acts*: it samples a batch with its current weights and stores what is needed to recompute the
log-probability of every action unit. The trainer never looks inside ``Rollout.extras``.

* ``rollout`` — no grad; returns a ``Rollout`` whose ``old_log_probs`` are those of the distribution that was
  actually sampled from (so the first on-policy ratio is exactly 1).
* ``unit_chunks`` — how the units of a minibatch are split into forward passes (the AR policy: one chunk of
  all tokens; the flow policy: one chunk per trained denoising step, so memory does not grow with steps).
* ``log_probs`` — with grad, the log-probs of one chunk under the current weights, and the per-unit KL to
  the reference when ``with_kl`` (LoRA adapter disabled, or a frozen copy when training all weights).

A generator family (``tandem.policies.families``) supplies the policies of the stages it has; its decoder
side is a ``FlowAdapter``.
"""

from __future__ import annotations

from typing import Dict, List, Protocol, Sequence, Tuple

import numpy as np
import torch

from tandem.core.types import LogProbs, Rollout


class Policy(Protocol):
    stage: str  # "ar" | "decoder"

    def rollout(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                first_group: int = 0, first_copy: int = 0) -> Rollout:
        """Sample ``group_size`` copies of each prompt (copies adjacent). No grad. ``seed`` is the rollout batch's
        (the same on every process); ``first_group`` / ``first_copy`` place this call's groups and copies in it,
        and seeds are derived from the three (``tandem.core.seeds``)."""

    def begin_rollout(self, rollouts: int, steps: int) -> None:
        """Before each rollout batch: this stage's rollout batches and optimizer steps so far (what the policy
        schedules by them, e.g. a sliding SDE window). ``TrainedComponent`` stores them; the trainer also sets
        ``inner_epoch``, the update epoch (0 … ``grpo.num_iterations`` − 1) over the current batch."""

    def prefetch(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                 first_copy: int = 0) -> None:
        """Before a rollout batch's ``rollout`` calls, where the trainer recomputes their log-probs: all their prompts
        in call order, for a policy that draws the whole batch in one pass (the AR policy's token sampling, whose
        cost hardly grows with the batch); the calls then return the same samples. Most policies do nothing."""

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

    def handoff(self, batch: Rollout) -> Dict[str, torch.Tensor]:
        """Batch-first tensors that condition the next stage on these samples (the AR stage's token grids,
        saved in the shared buffer and merged into each sample's metadata), or ``{}``."""

    @property
    def device(self) -> torch.device:
        """Where the policy's models run."""

    @property
    def rollout_matches_training(self) -> bool:
        """Whether the log-probs a rollout stores are those the training forward computes for the same weights
        (same numerics: the first on-policy ratio is 1); if not, ``grpo.old_log_probs: auto`` recomputes them."""


class FlowAdapter(Protocol):
    """What the flow (decoder) policy needs from a generator family: one adapter per family.

    Conditions are a dict of batch-first tensors, one row per prompt; the policy repeats them per group,
    keeps them with the rollout and hands them back to ``velocity``, so training replays exactly what the
    rollout saw. Latents follow the rectified-flow convention x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0.
    """

    device: torch.device
    denoiser: torch.nn.Module  # the trained component (a pipeline attribute)

    def conditions(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> Dict[str, torch.Tensor]:
        """Condition tensors of ``prompts`` (one row each), including whatever CFG's negative branch needs."""

    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (S,) and sigmas (S+1,) float32, the last sigma 0."""

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 standard-normal latents, row i drawn from ``seeds[i]``."""

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor],
                 guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) float32 velocity at timestep ``t``, with CFG when ``guidance_scale > 1``."""

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) latents -> (B, H, W, 3) uint8 images."""
