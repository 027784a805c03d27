"""Scoring one shard of a batch with one reward — the same code in a Ray actor and in-process.

* A plain reward is called on chunks of ``batch_size`` images (0 = the whole shard at once).
* A groupwise reward is called once per prompt group (``group_ids``), whatever ``batch_size`` is.
* A call that raises is retried one sample at a time; a sample that still raises scores NaN, and a groupwise
  call that raises scores NaN for its whole group. Each such event is a warning string returned with the
  scores, so the driver logs it on the ``tandem.rewards`` logger (actor logs do not reach the driver).
* A wrong number of scores is a contract violation: RewardError naming the reward, never retried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

from tandem.rewards.base import Reward, RewardError, logger


@dataclass
class ShardScores:
    """scores: float64 (len(indices),) in the order of ``indices``; warnings: one line per failed call/sample."""

    scores: np.ndarray
    warnings: List[str] = field(default_factory=list)


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


def _call(reward: Reward, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict], idx: np.ndarray) -> np.ndarray:
    return reward(images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx])


def _score_chunk(reward, images, prompts, metadata, idx: np.ndarray, warnings: List[str]) -> np.ndarray:
    try:
        return _call(reward, images, prompts, metadata, idx)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - any reward failure is scored NaN, never fatal
        if reward.groupwise or len(idx) == 1:
            warnings.append(f"reward '{reward.name}' failed on samples {idx.tolist()} ({_describe(e)}); scored NaN")
            return np.full(len(idx), np.nan)
        warnings.append(f"reward '{reward.name}' failed on a batch of {len(idx)} ({_describe(e)}); rescoring one sample at a time")
        return np.concatenate([_score_chunk(reward, images, prompts, metadata, idx[i : i + 1], warnings) for i in range(len(idx))])


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
    warnings: List[str] = []
    scores = np.full(len(indices), np.nan)
    position = {int(i): k for k, i in enumerate(indices)}
    for chunk in _chunks(indices, np.asarray(group_ids), reward.groupwise, batch_size):
        scores[[position[int(i)] for i in chunk]] = _score_chunk(reward, images, prompts, metadata, chunk, warnings)
    return ShardScores(scores, warnings)


def log_warnings(shard: ShardScores) -> None:
    """Emit a shard's warnings on the driver's ``tandem.rewards`` logger."""
    for line in shard.warnings:
        logger.warning(line)


def warn_unscored(scores: Dict[str, np.ndarray], what: str = "rollout") -> List[str]:
    """Warn loudly, one line per reward, when a reward scored none of a batch's samples (all None/NaN): it then
    gives no training signal. Returns the names of those rewards."""
    empty = [name for name, values in scores.items() if len(values) and np.isnan(values).all()]
    for name in empty:
        logger.warning(f"reward '{name}' scored none of the {len(scores[name])} samples of this {what} (all None/NaN): "
                       "it gives no training signal; check the reward and its args")
    return empty
