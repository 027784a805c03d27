"""Exponential moving average of trained weights, used for eval and sample grids.

ema <- decay_t * ema + (1 - decay_t) * theta after optimizer step t = 0, 1, 2, ... (flow_grpo keeps one for the
decoder), at the steps with (t + 1) % interval == 0 only (``decoder.ema_update_interval``; flow_grpo's
``update_step_interval``). decay_t = decay, or with ``decoder.ema_warmup`` flow_grpo's warm-up
min((1 + t) / (10 + t), decay) (``EMAModuleWrapper.get_current_decay``). The step count t is checkpointed.
Under FSDP (``tandem.rl.distributed.shard``) each process keeps the shadow of its own shards; ``state_dict`` gathers
whole tensors (collective) and ``load_state_dict`` keeps this process's shards of them.

The same shadow serves as DiffusionNFT's old policy (``grpo.nft_old_decay_type``; ``tandem.rl.nft``), blended with
the decay ``old_policy_decay`` of the optimizer steps so far (``blend``) before each rollout batch.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Tuple

import torch

from tandem.core.dtensor import full_tensor, shard_like


# DiffusionNFT's decay_type -> (flat, rate, cap) of its old policy's decay (NVlabs DiffusionNFT, return_decay)
OLD_DECAYS = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step: int, decay_type: int) -> float:
    """d(s) of DiffusionNFT's old policy, old ← d·old + (1 − d)·θ after s optimizer steps: 0 for s < flat, else
    min(rate·(s − flat), cap)::

        type 0:  d = 0                                  (the old policy is the current weights)
        type 1:  d = min(0.001·s, 0.5)
        type 2:  d = 0 for s < 75, min(0.0075·(s − 75), 0.999) after
    """
    flat, rate, cap = OLD_DECAYS[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, cap)


class EMA:
    """The shadow of ``named_params`` (the policy's trainable (name, parameter) pairs), saved by those names."""

    def __init__(self, named_params: Iterable[Tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = False,
                 interval: int = 1):
        self.decay, self.warmup, self.interval = decay, warmup, interval
        self.steps = 0  # optimizer steps seen (t); checkpointed beside the weights
        named = list(named_params)
        self.names: List[str] = [n for n, _ in named]
        self.shadow: List[torch.Tensor] = [p.detach().clone() for _, p in named]

    def current_decay(self, t: int) -> float:
        return min((1 + t) / (10 + t), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: Iterable[torch.nn.Parameter]) -> None:
        """After optimizer step t = ``self.steps`` (module docstring)."""
        t, self.steps = self.steps, self.steps + 1
        if (t + 1) % self.interval == 0:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.current_decay(t))

    @torch.no_grad()
    def blend(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        """shadow ← decay·shadow + (1 − decay)·θ with the given decay (an exact copy of θ at 0)."""
        params = [p.detach() for p in params]
        if decay == 0:
            for s, p in zip(self.shadow, params):
                s.copy_(p)
        else:
            torch._foreach_lerp_(self.shadow, params, 1.0 - decay)

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
        """Whole shadow tensors by parameter name (collective under FSDP); the step count is ``steps``."""
        return {n: full_tensor(t) for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: Dict[str, torch.Tensor], steps: int = 0) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        self.steps = steps
        self.shadow = [shard_like(state[n].clone(), s) for n, s in zip(self.names, self.shadow)]
