"""Periodic evaluation on held-out prompts, and the reward-hacking watch.

Every ``logging.eval_every`` steps the policy samples the first ``eval.num_prompts`` prompts of
``data.eval_prompts`` at its eval settings (fixed seed, so evals are comparable) and ``eval.rewards`` (or
the training rewards) score them. Logged: ``eval/<reward>/mean`` and ``eval/reward/mean`` (their weighted sum).

Reward-hacking watch: between two evals, if the mean training reward rose while the gold eval reward
(``eval.gold``, default the first eval reward) fell by more than ``eval.hacking_tolerance``, a warning is
logged and ``eval/hacking_warning`` is 1 (else 0).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

from tandem.rl.config import ConfigError, JobConfig
from tandem.core.data import load_prompts
from tandem.core.types import PromptRecord

log = logging.getLogger("tandem.eval")


class Evaluator:
    def __init__(self, cfg: JobConfig, client, records: Optional[List[PromptRecord]] = None):
        """``records``: the held-out prompt records, as the job read them (None = read ``data.eval_prompts``)."""
        self.cfg, self.client = cfg, client
        if records is None:
            records = load_prompts(cfg.data.eval_prompts, (cfg.data.height, cfg.data.width), cfg.data.allowed_roots)
        self.records = records[: cfg.eval.num_prompts or None]
        self.gold: Optional[str] = cfg.eval.gold
        if self.gold is not None and self.gold not in client.names:
            raise ConfigError(f"config key 'eval.gold' is {self.gold!r}; eval rewards: {', '.join(client.names)}")
        self.train_rewards: List[float] = []
        self.previous: Optional[tuple] = None  # (mean training reward, gold eval reward) at the last eval

    def sample(self, policy) -> np.ndarray:
        """The policy's images of the held-out prompts (fixed seed)."""
        return policy.sample([r.prompt for r in self.records], [r.metadata for r in self.records], seed=self.cfg.seed)

    def evaluate(self, policy, step: int, train_reward: float) -> Dict[str, float]:
        self.train_rewards.append(train_reward)
        prompts = [r.prompt for r in self.records]
        metadata = [r.metadata for r in self.records]
        images = self.sample(policy)
        result = self.client.score(images, prompts, metadata, np.arange(len(prompts))).result()
        means = {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in result.scores.items()}
        metrics = {f"eval/{name}/mean": m for name, m in means.items()}
        metrics["eval/reward/mean"] = float(sum(result.weights[n] * m for n, m in means.items()))
        gold = self.gold or next(iter(means))
        current = (float(np.mean(self.train_rewards)), means[gold])
        metrics["eval/hacking_warning"] = 0
        if self.previous is not None:
            train_up = current[0] > self.previous[0]
            gold_down = current[1] < self.previous[1] - self.cfg.eval.hacking_tolerance
            if train_up and gold_down:
                metrics["eval/hacking_warning"] = 1
                log.warning("step %d: possible reward hacking — training reward rose %.4f -> %.4f while eval %s fell "
                            "%.4f -> %.4f", step, self.previous[0], current[0], gold, self.previous[1], current[1])
        self.previous, self.train_rewards = current, []
        return metrics
