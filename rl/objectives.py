"""Training objectives: the extension point for what the update step minimises (``grpo.objective``).

An objective turns one chunk of a minibatch into a scalar loss and its metrics; the update step
(``tandem.rl.trainer.update_on_minibatch``) backpropagates each chunk's loss weighted by its share of the
units, so an objective never sees the optimizer, the accelerator or the processes. Register a new one with
``@OBJECTIVES.register("name")`` on a class with ``stages`` and ``loss(policy, batch, chunk, grpo)`` (made anew for each update); config
validation reads the registry, so its name is at once a valid ``grpo.objective``.

Metrics named ``*/min`` and ``*/max`` are merged over chunks by min and max, all others by the chunks' share.
"""

from __future__ import annotations

from typing import Dict, Protocol, Tuple

import torch

from tandem.core.registry import Registry
from tandem.core.types import Rollout
from tandem.rl.losses import policy_loss


class Objective(Protocol):
    stages: Tuple[str, ...]  # the policy stages it can train
    uses_old_log_probs: bool  # whether its loss reads Rollout.old_log_probs (then grpo.old_log_probs applies)

    def loss(self, policy, batch: Rollout, chunk: slice, grpo) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Scalar loss of ``batch``'s units in ``chunk`` (with grad) and float metrics; ``grpo`` is the config section."""


OBJECTIVES: Registry[Objective] = Registry("objective")


@OBJECTIVES.register("clipped_surrogate")
class ClippedSurrogate:
    """GRPO's clipped surrogate with an optional KL penalty (``tandem.rl.losses.policy_loss``), for both stages:
    AR tokens (TRL ``GRPOTrainer``) and decoder SDE steps (Flow-GRPO, Liu et al. 2025)."""

    stages = ("ar", "decoder")

    uses_old_log_probs = True

    def loss(self, policy, batch: Rollout, chunk: slice, grpo) -> Tuple[torch.Tensor, Dict[str, float]]:
        out = policy.log_probs(batch, chunk, with_kl=grpo.beta > 0)
        old = batch.old_log_probs[:, chunk]
        weights = None
        if grpo.rollout_is_cap is not None and batch.behaviour_log_probs is not None:
            weights = torch.exp(old - batch.behaviour_log_probs[:, chunk].to(old.device)).clamp(max=grpo.rollout_is_cap)
        return policy_loss(out.log_probs, old, batch.advantages, batch.mask[:, chunk], epsilon_low=grpo.epsilon,
                           epsilon_high=grpo.epsilon_high, loss_type=grpo.loss_type, kl=out.kl, beta=grpo.beta,
                           is_weights=weights)


def merge_chunk_metrics(parts) -> Dict[str, float]:
    """Metrics of one minibatch from (share, metrics) per chunk (module docstring: how they merge)."""
    merged = {}
    for key in parts[0][1]:
        values = [m[key] for _, m in parts]
        if key.endswith("/min"):
            merged[key] = min(values)
        elif key.endswith("/max"):
            merged[key] = max(values)
        else:
            merged[key] = float(sum(w * m[key] for w, m in parts))
    return merged
