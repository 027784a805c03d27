"""What a checkpoint restores besides weights: the global step, the rollout count and the cost meter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


@dataclass
class RunState:
    step: int = 0
    rollouts: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0
    first_reward: Optional[float] = None
    reward_ema: Optional[float] = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def cost_metrics(self, reward_mean: float) -> Dict[str, float]:
        """cost/s_per_reward = elapsed seconds / (EMA(0.9) of reward/mean - the first rollout's reward)."""
        if self.first_reward is None:
            self.first_reward = self.reward_ema = reward_mean
        self.reward_ema = 0.9 * self.reward_ema + 0.1 * reward_mean
        gain, elapsed = self.reward_ema - self.first_reward, self.elapsed()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"cost/elapsed_s": elapsed, "cost/gpu_s": elapsed * gpus, "cost/reward_gain": gain,
                "cost/s_per_reward": elapsed / gain if gain > 0 else None}

    def to_dict(self) -> Dict:
        return {"step": self.step, "rollouts": self.rollouts, "elapsed": self.elapsed(),
                "first_reward": self.first_reward, "reward_ema": self.reward_ema}

    def load(self, d: Dict) -> None:
        self.step, self.rollouts, self.elapsed_before = d["step"], d["rollouts"], d["elapsed"]
        self.first_reward, self.reward_ema = d["first_reward"], d["reward_ema"]
        self.started = time.perf_counter()
