"""Exponential moving average of trained weights, used for eval and sample grids.

ema <- decay_t * ema + (1 - decay_t) * theta after optimizer step t = 0, 1, 2, ... (flow_grpo keeps one for the
decoder), at the steps with (t + 1) % interval == 0 only (``decoder.ema_update_interval``; flow_grpo's
``update_step_interval``). decay_t = decay, or with ``decoder.ema_warmup`` flow_grpo's warm-up
min((1 + t) / (10 + t), decay) (``EMAModuleWrapper.get_current_decay``). The step count t is checkpointed.
Under FSDP (``tandem.rl.distributed.shard``) each process keeps the shadow of its own shards; ``state_dict`` gathers
whole tensors (collective) and ``load_state_dict`` keeps this process's shards of them.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List

import torch

from tandem.core.dtensor import full_tensor, shard_like


class EMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float, warmup: bool = False, interval: int = 1):
        self.decay, self.warmup, self.interval = decay, warmup, interval
        self.steps = 0  # optimizer steps seen (t)
        self.shadow: List[torch.Tensor] = [p.detach().clone() for p in params]

    def current_decay(self, t: int) -> float:
        return min((1 + t) / (10 + t), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: Iterable[torch.nn.Parameter]) -> None:
        """After optimizer step t = ``self.steps`` (module docstring)."""
        t, self.steps = self.steps, self.steps + 1
        if (t + 1) % self.interval == 0:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.current_decay(t))

    @contextlib.contextmanager
    def swapped(self, params: Iterable[torch.nn.Parameter]):
        """Temporarily load the EMA weights into ``params``."""
        params = list(params)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def shard_like(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Lay the shadow out like ``params`` after they were sharded in place."""
        self.shadow = [shard_like(s, p.detach()) for s, p in zip(self.shadow, params)]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"steps": torch.tensor(self.steps, dtype=torch.int64),
                **{f"ema.{i}": full_tensor(t) for i, t in enumerate(self.shadow)}}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"]) if "steps" in state else 0
        self.shadow = [shard_like(state[f"ema.{i}"].clone(), s) for i, s in enumerate(self.shadow)]
