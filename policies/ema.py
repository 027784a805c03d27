"""Exponential moving average of trained weights, used for eval and sample grids.

ema <- decay * ema + (1 - decay) * theta after every optimizer step (flow_grpo keeps one for the decoder).
Under FSDP (``tandem.rl.distributed.shard``) each process keeps the shadow of its own shards; ``state_dict`` gathers
whole tensors (collective) and ``load_state_dict`` keeps this process's shards of them.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Tuple

import torch

from tandem.core.dtensor import full_tensor, shard_like


class EMA:
    """The shadow of ``named_params`` (the policy's trainable (name, parameter) pairs), saved by those names."""

    def __init__(self, named_params: Iterable[Tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        named = list(named_params)
        self.names: List[str] = [n for n, _ in named]
        self.shadow: List[torch.Tensor] = [p.detach().clone() for _, p in named]

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
        """Whole shadow tensors by parameter name (collective under FSDP)."""
        return {n: full_tensor(t) for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        self.shadow = [shard_like(state[n].clone(), s) for n, s in zip(self.names, self.shadow)]
