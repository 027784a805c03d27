"""Per-prompt reward statistics across rollouts (``grpo.per_prompt_stat_tracking``).

DDPO's ``PerPromptStatTracker`` (Black et al. 2023, ddpo_pytorch/stat_tracking.py), which flow_grpo keeps
(flow_grpo/stat_tracking.py): every prompt has a history of its last ``buffer_size`` combined rewards R (0 =
unbounded); a rollout first appends its rewards of the prompt, then normalises them by the history's statistics,

    A_i = (R_i - mean(H_p)) / (std(H_p) + 1e-4),        p = prompt of sample i, std with ddof 0 (numpy's),

or, while the history holds fewer than ``min_count`` rewards, by the batch's mean and std over all prompts.
NaN rewards (no score) are left out of the histories and get advantage 0. The eps is flow_grpo's 1e-4 (DDPO
uses 1e-6). flow_grpo clears the tracker after every rollout (its history is the current batch only); DDPO keeps it.
The histories are the tracker's whole state (``state_dict``), saved in checkpoints so a resumed run continues them.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

EPS = 1e-4


class PerPromptStatTracker:
    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: Dict[str, List[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Append this batch's rewards (B,) of prompts (B,), then return the advantages (B,) float64 (NaN where
        R is NaN)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        prompts = np.asarray(list(prompts), dtype=object)
        finite = rewards[np.isfinite(rewards)]
        batch_mean = finite.mean() if finite.size else np.nan
        batch_std = finite.std() if finite.size else 0.0
        advantages = np.full_like(rewards, np.nan)
        for prompt in dict.fromkeys(prompts.tolist()):
            rows = prompts == prompt
            mine = rewards[rows]
            history = self.history.setdefault(prompt, [])
            history.extend(float(r) for r in mine[np.isfinite(mine)])
            if self.buffer_size:
                del history[:-self.buffer_size]
            if len(history) < max(self.min_count, 1):
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(history), np.std(history)
            advantages[rows] = (mine - mean) / (std + EPS)
        return advantages

    def state_dict(self) -> Dict[str, List[float]]:
        return {prompt: list(values) for prompt, values in self.history.items()}

    def load_state_dict(self, state: Dict[str, List[float]]) -> None:
        self.history = {prompt: [float(v) for v in values] for prompt, values in state.items()}
