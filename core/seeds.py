"""Seeds of one rollout call, derived per prompt group and per copy, so that the processes of a data-parallel
job agree on everything a group shares.

A rollout batch has one seed (``seed``, the same on every process). Group ``G`` is the global index of a prompt in
the rollout batch (the same on every process: all processes draw the same prompts); copy ``C`` is the index of a
sample within its group over all processes (process r holds copies r·n … r·n + n − 1 of every group, n =
num_generations / processes). The SDE window is shared by the whole batch (seeded from ``seed`` alone); whatever a
group shares (its starting noise with ``same_noise_in_group``, the frozen decoder's noise for AR-stage rewards) is
seeded from (seed, G); whatever differs between copies (their noise, their AR tokens) from (seed, G, C), and every sampler draws each copy from
its own seeded stream (never one stream over the batch). So N processes sample the same rollout as one process
holding all the copies, and calls of any size (``grpo.rollout_batch_size``) sample what one call would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# What a seed is for: part of the derivation, so that no two uses share a stream. OBJECTIVE: an objective's own
# per-copy draws after the rollout (DiffusionNFT's forward-process timesteps and noise).
WINDOW, CONDITIONS, NOISE, SDE, TOKENS, DECODE, OBJECTIVE = range(7)


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**63) from non-negative integers (numpy ``SeedSequence``: order-sensitive, well mixed; the
    count goes first because ``SeedSequence`` ignores trailing zeros)."""
    return int(np.random.SeedSequence([len(parts), *(int(p) for p in parts)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class RolloutSeeds:
    """seed: the rollout batch's seed; first_group: global index of this call's first group; first_copy: index of
    this process's first copy within each group."""

    seed: int
    first_group: int = 0
    first_copy: int = 0

    def batch(self, purpose: int) -> int:
        """One seed for the whole rollout batch (the same for every call and every process)."""
        return derive_seed(self.seed, purpose)

    def call(self, purpose: int) -> int:
        """One seed for this call's groups together (the same on every process)."""
        return derive_seed(self.seed, purpose, self.first_group)

    def group(self, purpose: int, g: int) -> int:
        """The seed of local group ``g`` (the same on every process)."""
        return derive_seed(self.seed, purpose, self.first_group + g)

    def copy(self, purpose: int, g: int, c: int) -> int:
        """The seed of local copy ``c`` of local group ``g`` (distinct for every sample of the rollout batch)."""
        return derive_seed(self.seed, purpose, self.first_group + g, self.first_copy + c)
