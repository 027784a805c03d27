"""Scoring one shard of a batch with one reward — the same code in a Ray actor and in-process.

* A plain reward is called on chunks of ``batch_size`` images (0 = the whole shard at once).
* A groupwise reward is called once per prompt group (``group_ids``), whatever ``batch_size`` is.
* A call that raises is retried one sample at a time; a sample that still raises scores NaN, and a groupwise
  call that raises scores NaN for its whole group. Each such event is a warning string returned with the
  scores, so the driver logs it on the ``tandem.rewards`` logger (actor logs do not reach the driver).
* A wrong number of scores is a contract violation: RewardError naming the reward, never retried.

Samples whose scoring raised are marked in ``ShardScores.failed`` (a None score is not a failure), so the
driver can stop a job whose reward keeps failing (``FailureGuard``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from tandem.rewards.base import Reward, RewardError, logger


@dataclass
class ShardScores:
    """Scores of ``indices`` (in their order), n = len(indices).

    scores: float64 (n,), NaN = no score; failed: bool (n,), True where scoring raised; info: n dicts of
    readable details (``ScoresWithInfo``); warnings: one line per failed call/sample.
    """

    scores: np.ndarray
    failed: np.ndarray
    info: List[dict]
    warnings: List[str] = field(default_factory=list)
    error: Optional[str] = None  # the first failure, "Type: message"

    @staticmethod
    def merge(parts: Sequence[tuple], n: int) -> "ShardScores":
        """One ShardScores for a whole batch of n from (indices, ShardScores) per shard."""
        out = ShardScores(np.full(n, np.nan), np.zeros(n, dtype=bool), [{} for _ in range(n)])
        for idx, shard in parts:
            out.scores[idx], out.failed[idx] = shard.scores, shard.failed
            for i, d in zip(idx, shard.info):
                out.info[int(i)] = d
            out.warnings += shard.warnings
            out.error = out.error or shard.error
        return out


def group_units(indices: np.ndarray, group_ids: np.ndarray) -> List[np.ndarray]:
    """Split ``indices`` into its prompt groups (in order of first appearance)."""
    ids = group_ids[indices]
    _, first = np.unique(ids, return_index=True)
    return [indices[ids == ids[i]] for i in sorted(first)]


def split_shards(n: int, group_ids: np.ndarray, groupwise: bool, parts: int) -> List[np.ndarray]:
    """Indices 0..n-1 in at most ``parts`` near-equal contiguous shards; whole groups for a groupwise reward."""
    all_idx = np.arange(n)
    units = group_units(all_idx, group_ids) if groupwise else [all_idx[i : i + 1] for i in range(n)]
    bounds = np.linspace(0, len(units), min(parts, len(units)) + 1).round().astype(int)
    return [np.concatenate(units[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _chunks(indices: np.ndarray, group_ids: np.ndarray, groupwise: bool, batch_size: int) -> List[np.ndarray]:
    if groupwise:
        return group_units(indices, group_ids)
    size = batch_size if batch_size > 0 else max(len(indices), 1)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _score_chunk(reward, images, prompts, metadata, idx: np.ndarray, out: ShardScores, position: Dict[int, int]) -> None:
    """Score the samples ``idx`` (batch indices) into ``out`` at their positions."""
    where = [position[int(i)] for i in idx]
    try:
        scores, info = reward.score(images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx])
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - any reward failure is scored NaN, never fatal
        out.error = out.error or _describe(e)
        if reward.groupwise or len(idx) == 1:
            out.warnings.append(f"reward '{reward.name}' failed on samples {idx.tolist()} ({_describe(e)}); scored NaN")
            out.failed[where] = True
            return
        out.warnings.append(f"reward '{reward.name}' failed on a batch of {len(idx)} ({_describe(e)}); rescoring one sample at a time")
        for i in range(len(idx)):
            _score_chunk(reward, images, prompts, metadata, idx[i : i + 1], out, position)
        return
    out.scores[where] = scores
    for k, d in zip(where, info):
        out.info[k] = d


def score_shard(
    reward: Reward,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[dict],
    group_ids: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
) -> ShardScores:
    """Score ``images[indices]`` (images: uint8 (B, H, W, 3) of the whole batch) -> ShardScores."""
    indices = np.asarray(indices)
    n = len(indices)
    out = ShardScores(np.full(n, np.nan), np.zeros(n, dtype=bool), [{} for _ in range(n)])
    position = {int(i): k for k, i in enumerate(indices)}
    for chunk in _chunks(indices, np.asarray(group_ids), reward.groupwise, batch_size):
        _score_chunk(reward, images, prompts, metadata, chunk, out, position)
    return out


def log_warnings(shard: ShardScores) -> None:
    """Emit a shard's warnings on the driver's ``tandem.rewards`` logger."""
    for line in shard.warnings:
        logger.warning(line)


class FailureGuard:
    """Stops a job whose reward keeps failing: RewardError naming the reward once it raised on more than
    ``max_frac`` of a rollout's samples in ``max_rollouts`` consecutive rollouts (``reward_host.max_failed_*``)."""

    def __init__(self, max_frac: float, max_rollouts: int):
        self.max_frac, self.max_rollouts = max_frac, max_rollouts
        self.streak: Dict[str, int] = {}

    def observe(self, failed: Dict[str, np.ndarray], errors: Dict[str, Optional[str]]) -> None:
        """One rollout's failure masks {reward: bool (B,)} and first error line per reward (or None)."""
        for name, mask in failed.items():
            frac = float(np.mean(mask)) if len(mask) else 0.0
            self.streak[name] = self.streak.get(name, 0) + 1 if frac > self.max_frac else 0
            if self.streak[name] >= self.max_rollouts:
                raise RewardError(
                    f"reward '{name}' failed on {int(np.sum(mask))}/{len(mask)} samples (> reward_host.max_failed_frac="
                    f"{self.max_frac}) in {self.streak[name]} consecutive rollouts (reward_host.max_failed_rollouts); "
                    f"first error: {errors.get(name) or '?'}; fix the reward, or raise reward_host.max_failed_frac"
                )


def warn_unscored(scores: Dict[str, np.ndarray], what: str = "rollout") -> List[str]:
    """Warn loudly, one line per reward, when a reward scored none of a batch's samples (all None/NaN): it then
    gives no training signal. Returns the names of those rewards."""
    empty = [name for name, values in scores.items() if len(values) and np.isnan(values).all()]
    for name in empty:
        logger.warning(f"reward '{name}' scored none of the {len(scores[name])} samples of this {what} (all None/NaN): "
                       "it gives no training signal; check the reward and its args")
    return empty
