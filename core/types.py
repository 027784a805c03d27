"""Data records passed between policies, rewards and the trainer (shapes documented per field).

B = rollout batch (prompts_per_step x num_generations), U = action units per sample: tokens for the AR
policy, trained denoising steps for the flow policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class PromptRecord:
    """One prompt and its metadata (``text`` to render, ``reference`` image, ... handed to the rewards)."""

    prompt: str
    metadata: Dict[str, Any]


def _take(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[index.cpu().numpy()]
    if isinstance(value, list):
        return [value[i] for i in index.tolist()]
    if isinstance(value, dict):
        return {k: _take(v, index) for k, v in value.items()}
    return value  # scalars and shared settings travel unchanged


@dataclass
class Rollout:
    """One batch of samples from ``Policy.rollout`` — everything needed to score and to recompute log-probs.

    Attributes:
        images: (B, H, W, 3) uint8 RGB, what the rewards judge.
        prompts: B prompts; copies of one prompt are adjacent.
        metadata: B dicts (e.g. ``text``, ``reference``) handed to the rewards.
        group_ids: (B,) int64, the prompt group of each sample.
        old_log_probs: (B, U) float32 log-probs of the actions under the sampling distribution, no grad.
        mask: (B, U) float32 loss weights of the units (0 = not an action; segment weights folded in).
        extras: policy-specific tensors with batch dim first (tokens, positions, latents, ...); scalars and
            non-batched settings may sit here too and are passed through unchanged by ``select``.
        advantages: (B,) float32, filled by the trainer after scoring.
        behaviour_log_probs: (B, U) float32, the sampler's log-probs when ``old_log_probs`` were recomputed by
            the trainer (``grpo.old_log_probs``), else None.
    """

    images: np.ndarray
    prompts: List[str]
    metadata: List[Dict[str, Any]]
    group_ids: np.ndarray
    old_log_probs: torch.Tensor
    mask: torch.Tensor
    extras: Dict[str, Any] = field(default_factory=dict)
    advantages: Optional[torch.Tensor] = None
    behaviour_log_probs: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows ``index`` (1-D int64) of every batched field — a minibatch."""
        return replace(
            self,
            images=_take(self.images, index), prompts=_take(self.prompts, index),
            metadata=_take(self.metadata, index), group_ids=_take(self.group_ids, index),
            old_log_probs=_take(self.old_log_probs, index), mask=_take(self.mask, index),
            extras=_take(self.extras, index), advantages=_take(self.advantages, index),
            behaviour_log_probs=_take(self.behaviour_log_probs, index),
        )


@dataclass
class LogProbs:
    """Output of ``Policy.log_probs`` for one chunk of units (with grad).

    Attributes:
        log_probs: (B, u) float32 log-probs of the stored actions under the current policy.
        kl: (B, u) float32 per-unit KL to the reference, or None when not asked for.
        refresh: what else this forward says about the policy at these units, (B, u, ...) tensors keyed as in
            ``Rollout.extras`` (the flow policy: ``old_means``, the step means the actions are scored under). When
            the trainer recomputes the old log-probs (``grpo.old_log_probs``) it writes them back into the
            rollout's extras with them, so old log-probs and old means come from one forward. Empty for none.
    """

    log_probs: torch.Tensor
    kl: Optional[torch.Tensor] = None
    refresh: Dict[str, torch.Tensor] = field(default_factory=dict)


def group_ids_for(num_prompts: int, group_size: int) -> np.ndarray:
    """(num_prompts * group_size,) ids [0,0,..,1,1,..]: copies of a prompt are adjacent."""
    return np.repeat(np.arange(num_prompts, dtype=np.int64), group_size)


def repeat_for_groups(items: Sequence[Any], group_size: int) -> List[Any]:
    return [item for item in items for _ in range(group_size)]
