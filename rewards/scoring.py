"""Scoring one shard of a batch with one reward — the same code in a Ray actor and in-process.

* A plain reward is called on chunks of ``batch_size`` images (0 = the whole shard at once).
* A groupwise reward is called once per prompt group (``group_ids``), whatever ``batch_size`` is.
* A call that raises is retried one sample at a time; a sample that still raises scores NaN, and a groupwise
  call that raises scores NaN for its whole group. Each such event is a warning string returned with the
  scores, so the driver logs it on the ``tandem.rewards`` logger (actor logs do not reach the driver).
* A returned value that is not a number (+-inf, a string, any object; ``base.to_scores``) scores NaN with a
  warning, and counts as a failure like a sample whose scoring raised.
* A wrong number of scores is a contract violation: RewardError naming the reward, never retried.

Samples whose scoring raised or gave a non-number are marked in ``ShardScores.failed`` (None or NaN is "no
score", returned on purpose, not a failure), so the driver can stop a job whose reward keeps failing
(``FailureGuard``, which also stops one that scores none of a rollout's samples, rollout after rollout).
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
        call = reward.score(images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx])
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
    out.scores[where] = call.scores
    for k, d in zip(where, call.info):
        out.info[k] = d
    if call.not_numbers:
        _mark_not_numbers(reward.name, idx, call.not_numbers, out, [where[i] for i in call.not_numbers])


def _mark_not_numbers(name: str, idx: np.ndarray, not_numbers: Dict[int, str], out: ShardScores, where: List[int]) -> None:
    """Count the values of a call that are not numbers (already scored NaN) as failures, with one warning."""
    samples = [int(idx[i]) for i in not_numbers]
    shown = ", ".join(list(not_numbers.values())[:3]) + (", ..." if len(not_numbers) > 3 else "")
    out.failed[where] = True
    out.error = out.error or f"returned {next(iter(not_numbers.values()))}, not a number"
    out.warnings.append(f"reward '{name}' returned values that are not numbers for samples {samples} ({shown}); "
                        "scored as no score and counted as failures (a reward returns finite numbers, or None for no score)")


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
    """Stops a job whose reward keeps failing (``reward_host.max_failed_*``).

    A rollout counts against a reward when the reward failed (raised, or returned a non-number) on more than
    ``max_frac`` of its samples, or when it scored none of them (every sample None/NaN: no training signal).
    ``max_rollouts`` such rollouts in a row raise RewardError naming the reward and the cause.
    """

    def __init__(self, max_frac: float, max_rollouts: int):
        self.max_frac, self.max_rollouts = max_frac, max_rollouts
        self.streak: Dict[str, int] = {}

    def observe(self, failed: Dict[str, np.ndarray], errors: Dict[str, Optional[str]],
                scores: Optional[Dict[str, np.ndarray]] = None) -> None:
        """One rollout's failure masks {reward: bool (B,)}, first error line per reward (or None), and its
        scores {reward: float64 (B,), NaN = no score} (None: only the failures count)."""
        for name, mask in failed.items():
            values = None if scores is None else np.asarray(scores[name])
            unscored = values is not None and len(values) > 0 and bool(np.isnan(values).all())
            frac = float(np.mean(mask)) if len(mask) else 0.0
            self.streak[name] = self.streak.get(name, 0) + 1 if frac > self.max_frac or unscored else 0
            if self.streak[name] >= self.max_rollouts:
                raise RewardError(self._message(name, mask, errors.get(name), frac > self.max_frac))

    def _message(self, name: str, mask: np.ndarray, error: Optional[str], over: bool) -> str:
        rollouts = f"in {self.streak[name]} consecutive rollouts (reward_host.max_failed_rollouts)"
        if over:
            return (f"reward '{name}' failed on {int(np.sum(mask))}/{len(mask)} samples (> reward_host.max_failed_frac="
                    f"{self.max_frac}) {rollouts}; first error: {error or '?'}; fix the reward, or raise "
                    "reward_host.max_failed_frac")
        return (f"reward '{name}' scored none of the {len(mask)} samples (every score None or NaN) {rollouts}: it gives no "
                "training signal; check the reward, its args and the prompts' metadata")


def warn_unscored(scores: Dict[str, np.ndarray], what: str = "rollout") -> List[str]:
    """Warn loudly, one line per reward, when a reward scored none of a batch's samples (all None/NaN): it then
    gives no training signal. Returns the names of those rewards."""
    empty = [name for name, values in scores.items() if len(values) and np.isnan(values).all()]
    for name in empty:
        logger.warning(f"reward '{name}' scored none of the {len(scores[name])} samples of this {what} (all None/NaN): "
                       "it gives no training signal; check the reward and its args")
    return empty
