"""Data-parallel GRPO across processes (accelerate / torchrun / Ray Train workers), over torch.distributed.

The group sampler spreads each prompt's ``num_generations`` copies over the N processes: every process draws
the same prompts (same seed) and rolls out ``num_generations / N`` copies of each, with its own sampling
seed. Rewards are all-gathered so that advantages are computed over whole groups — the same advantages a
single process would compute — and each process keeps those of its own samples. Gradients are averaged
across processes after each minibatch's backward (what DDP does), so every process applies the same update
and the weights stay identical; a minibatch of ``grpo.mini_batch_size`` samples is split N ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from rl.config import ConfigError, JobConfig


@dataclass
class Layout:
    """This process's share of the rollout batch."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_sizes(self, cfg: JobConfig):
        """(copies of each prompt, minibatch size) on this process; both must split evenly."""
        g = cfg.grpo
        for key, value in (("grpo.num_generations", g.num_generations), ("grpo.mini_batch_size", g.mini_batch_size)):
            if value % self.world:
                raise ConfigError(f"config key '{key}' is {value}; with {self.world} processes it must be a multiple of {self.world}")
        return g.num_generations // self.world, g.mini_batch_size // self.world

    def gather_groups(self, local: Dict[str, np.ndarray], group_ids: np.ndarray):
        """All processes' scores and group ids, concatenated in rank order (identical on every process)."""
        if self.world == 1:
            return local, group_ids
        parts: List = [None] * self.world
        torch.distributed.all_gather_object(parts, (local, group_ids))
        scores = {name: np.concatenate([p[0][name] for p in parts]) for name in local}
        return scores, np.concatenate([p[1] for p in parts])

    def local_slice(self, n_local: int) -> slice:
        return slice(self.rank * n_local, (self.rank + 1) * n_local)

    def average_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """grad <- mean over processes (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Loss metrics averaged over processes (min/max keep their extremes)."""
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        lo, hi = t.clone(), t.clone()
        torch.distributed.all_reduce(t)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        t /= self.world
        pick = {k: (lo if k.endswith("/min") else hi if k.endswith("/max") else t)[i].item() for i, k in enumerate(keys)}
        return pick


def layout_of(accelerator) -> Layout:
    return Layout(rank=accelerator.process_index, world=accelerator.num_processes)
