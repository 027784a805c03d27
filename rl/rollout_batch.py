"""How many samples one rollout call takes: ``grpo.rollout_batch_size``, apart from the training minibatch.

A rollout call is whole groups and whole minibatches, so the update's minibatches are those of the whole rollout
batch whatever the call size: its size (on this process) is a multiple of ``unit = lcm(copies, minibatch)``. What is
sampled never depends on the call size (per-copy seeds, ``tandem.core.seeds``), only how fast it is.

* ``grpo.rollout_batch_size: N`` (> 0) — calls of N samples, split over processes like ``grpo.mini_batch_size``.
* ``0`` ("auto"), per stage:
  - on a CPU, today's layout: calls of one minibatch when a minibatch is whole groups, else the whole batch,
    with the forward in minibatch-sized chunks (the training layout: the first ratio is exactly 1 in fp32);
  - on a GPU, **measured**: the stage's first call takes one ``unit`` while the device's peak allocation is
    recorded, p = (peak − allocated before) / unit bytes per sample; every later call takes the largest multiple
    of ``unit`` with size · p ≤ ``AUTO_MEMORY_FRACTION`` × (free device memory + PyTorch's cached free memory),
    capped at the batch. The choice is logged once, with its figures.

The chosen size is also the policy's forward batch in the rollout (``TrainedComponent.rollout_chunk_size``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Optional

import torch

log = logging.getLogger("tandem.trainer")

AUTO_MEMORY_FRACTION = 0.85
"""Share of the memory free at measurement that an auto-sized rollout call may take at its peak."""


class RolloutBatching:
    """Call sizes of one stage's rollouts (module docstring).

    Args:
        requested: ``grpo.rollout_batch_size`` on this process (0 = auto).
        copies: samples of each group on this process.
        minibatch: ``grpo.mini_batch_size`` on this process.
        device: where the policy runs (auto measures CUDA memory).
    """

    def __init__(self, requested: int, copies: int, minibatch: int, device: torch.device):
        self.copies, self.minibatch, self.device = copies, minibatch, device
        self.unit = math.lcm(copies, minibatch)
        cpu_auto = requested == 0 and device.type != "cuda"
        # None: auto on a GPU, set by the first call (``measuring``); 0: the whole batch in one call
        self.size: Optional[int] = requested or None
        if cpu_auto:
            self.size = minibatch if minibatch % copies == 0 else 0
        self.forward_chunk: Optional[int] = minibatch if cpu_auto else None
        """Samples per forward inside a call: the minibatch under CPU auto (the training layout), else the call."""

    @property
    def forwards_minibatches(self) -> bool:
        """Whether every rollout forward is one minibatch (the training forward's batch layout)."""
        return self.forward_chunk is not None or self.size == self.minibatch

    def next_call(self, remaining: int) -> int:
        """Samples of the next call out of ``remaining`` (a multiple of ``unit`` or the whole remainder)."""
        if self.size is None:  # auto on a GPU, not measured yet: one unit
            return min(self.unit, remaining)
        return min(self.size or remaining, remaining)

    @contextlib.contextmanager
    def measuring(self, samples: int, total: int) -> Iterator[None]:
        """Around a call of ``samples``: the first auto call on a GPU measures its peak and sets ``size``."""
        if self.size is not None:
            yield
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield
        torch.cuda.synchronize(self.device)
        per_sample = max(torch.cuda.max_memory_allocated(self.device) - before, 1) / samples
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        fits = int(AUTO_MEMORY_FRACTION * (free + cached) // per_sample) // self.unit * self.unit
        self.size = max(self.unit, min(fits, total))
        log.info("grpo.rollout_batch_size auto: a rollout call peaks at %.2f GiB per sample and %.1f GiB are free; "
                 "%d samples per call (of %d)", per_sample / 2**30, (free + cached) / 2**30, self.size, total)
