"""The seeded prompt sampler (prompt files are read by ``tandem.core.data``)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from tandem.core.types import PromptRecord


class PromptSampler:
    """Seeded epochs over the prompts: ``next_batch(k)`` returns k records, reshuffling at each epoch end.

    Its seed and position (epoch, index) are part of a checkpoint, so a resumed run sees the same prompt stream.
    """

    def __init__(self, records: List[PromptRecord], seed: int, shuffle: bool = True):
        self.records, self.seed, self.shuffle = records, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.records))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next_batch(self, k: int) -> List[PromptRecord]:
        out = []
        while len(out) < k:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue at ``state``'s position (and seed: a joint job's decoder phases each draw with their own)."""
        self.seed = int(state.get("seed", self.seed))  # checkpoints of older tandems kept no seed
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()
