"""What a checkpoint restores besides weights: the global step, the rollout count, the same two counts per stage,
and the cost meter.

A joint job has two stages, and what a stage schedules by steps or rollouts (MixGRPO's sliding SDE window,
DiffusionNFT's old-policy decay) counts that stage's own: ``stage_steps`` and ``stage_rollouts``. A checkpoint
taken at the job's last step counts that step's rollout batch as done (``rl/session.py`` saves ``rollouts`` + 1);
``load`` gives the difference to the stage that took the step (``active_stage``), so the per-stage rollout counts
add up to ``rollouts`` again.

The cost meter's clock (``cost/elapsed_s``) counts the seconds since the job's training started: it starts
(``start_clock``) once the pipeline is loaded and the rewards are built (``rl/session.py`` logs those start-up
seconds apart), and a resumed job adds the elapsed seconds its checkpoint kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass
class RunState:
    step: int = 0
    rollouts: int = 0
    stage_steps: Dict[str, int] = field(default_factory=dict)  # optimizer steps per stage
    stage_rollouts: Dict[str, int] = field(default_factory=dict)  # rollout batches done per stage
    active_stage: Optional[str] = None  # the stage of the latest optimizer step
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0
    first_reward: Optional[float] = None
    reward_ema: Optional[float] = None

    def count_step(self, stage: str) -> None:
        """One optimizer step of ``stage``."""
        self.step += 1
        self.stage_steps[stage] = self.stage_steps.get(stage, 0) + 1
        self.active_stage = stage

    def count_rollout(self, stage: str) -> None:
        """One rollout batch of ``stage`` done (its updates included)."""
        self.rollouts += 1
        self.stage_rollouts[stage] = self.stage_rollouts.get(stage, 0) + 1

    def stage_counts(self, stage: str) -> Tuple[int, int]:
        """(rollout batches done, optimizer steps taken) of ``stage``."""
        return self.stage_rollouts.get(stage, 0), self.stage_steps.get(stage, 0)

    def start_clock(self) -> None:
        """Training starts now: ``elapsed`` counts from here (module docstring)."""
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training: those a resumed checkpoint kept, plus those since ``start_clock`` (or ``load``)."""
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
                "first_reward": self.first_reward, "reward_ema": self.reward_ema,
                "stage_steps": dict(self.stage_steps), "stage_rollouts": dict(self.stage_rollouts),
                "active_stage": self.active_stage}

    def load(self, d: Dict) -> None:
        self.step, self.rollouts, self.elapsed_before = d["step"], d["rollouts"], d["elapsed"]
        self.first_reward, self.reward_ema = d["first_reward"], d["reward_ema"]
        self.stage_steps = {k: int(v) for k, v in d.get("stage_steps", {}).items()}
        self.stage_rollouts = {k: int(v) for k, v in d.get("stage_rollouts", {}).items()}
        self.active_stage = d.get("active_stage")
        unfinished = self.rollouts - sum(self.stage_rollouts.values())
        if unfinished > 0 and self.active_stage is not None:  # saved at the last step (module docstring)
            self.stage_rollouts[self.active_stage] = self.stage_rollouts.get(self.active_stage, 0) + unfinished
        self.started = time.perf_counter()
