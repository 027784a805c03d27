"""Exponential moving average of trained weights, used for eval and sample grids.

ema <- decay * ema + (1 - decay) * theta after every optimizer step (flow_grpo keeps one for the decoder).
Under FSDP (``tandem.rl.distributed.shard``) each process keeps the shadow of its own shards; ``state_dict`` gathers
whole tensors (collective) and ``load_state_dict`` keeps this process's shards of them.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List

import torch

from tandem.core.dtensor import full_tensor, shard_like


class EMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow: List[torch.Tensor] = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Iterable[torch.nn.Parameter]) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.decay)

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
        return {f"ema.{i}": full_tensor(t) for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.shadow = [shard_like(state[f"ema.{i}"].clone(), s) for i, s in enumerate(self.shadow)]
