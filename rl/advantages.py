"""Group-relative advantages (GRPO) from several rewards, NaN-safe.

Notation: B samples, rewards k = 1..K with scores r_ik (NaN or +-inf = no score) and weights w_k, group g(i) = the
prompt group of sample i (``group_ids``). Statistics over a set ignore NaN; ``std`` is Bessel-corrected
(ddof = 1) like TRL's ``nanstd``, and is 0 for fewer than two values.

normalise(x) with ``scale_rewards`` (TRL ``scale_rewards``):
    group:  (x_i - mean_{g(i)} x) / (std_{g(i)} x + eps)
    batch:  (x_i - mean_{g(i)} x) / (std_batch x + eps)       (mean still per group)
    none:    x_i - mean_{g(i)} x

``aggregation`` (TRL ``multi_objective_aggregation``, trl/trainer/grpo_trainer.py, TRL 1.16):
    sum_then_normalize:  R_i = sum_k w_k r_ik over the k with a score;   A = normalise(R)
    normalize_then_sum:  z_ik = (r_ik - mean_{g(i)} r_.k) / (std_{g(i)} r_.k + eps) per reward, whatever
                         ``scale_rewards`` says (TRL ignores it here);  S_i = sum_k w_k z_ik over the k with a
                         score;  A_i = (S_i - mean S) / (std S + eps)        (TRL re-standardises over the batch)
With ``stat_tracker`` (``grpo.per_prompt_stat_tracking``, ``tandem.rl.stat_tracking``) A is instead R normalised
by the statistics of the prompt's reward history; ``aggregation`` and ``scale_rewards`` are then unused.
A sample with no score at all has R_i = NaN and gets A_i = 0, so does every sample of a group where nothing
was scored; then A is clipped to [-clip, clip] when ``clip`` is given (flow_grpo ``adv_clip_max``).

``rewards`` in the result is the combined reward R_i of sum_then_normalize (what is logged as reward/mean).
``zero_std_frac`` = share of groups whose scored R all tie (fewer than two scores, or std ~ 0): groups that
carry no learning signal (TRL ``frac_reward_zero_std``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from tandem.core.registry import Registry
from tandem.rl.stat_tracking import PerPromptStatTracker

EPS = 1e-4


@dataclass
class AdvantageResult:
    """advantages: float32 (B,); rewards: float64 (B,) combined (NaN = unscorable); metrics: name -> float."""

    advantages: np.ndarray
    rewards: np.ndarray
    zero_std_frac: float
    metrics: Dict[str, float]


# ------------------------------------------------------------------------------------------ NaN-aware stats
def nanmean(x: np.ndarray) -> float:
    valid = x[~np.isnan(x)]
    return float(valid.mean()) if valid.size else float("nan")


def nanstd(x: np.ndarray) -> float:
    """Bessel-corrected std over the non-NaN values; 0 for fewer than two of them."""
    valid = x[~np.isnan(x)]
    return float(valid.std(ddof=1)) if valid.size > 1 else 0.0


def _per_group(x: np.ndarray, inverse: np.ndarray, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    """stat over each group, broadcast back to the samples: (B,)."""
    values = np.array([stat(x[inverse == g]) for g in range(inverse.max() + 1)]) if x.size else np.zeros(0)
    return values[inverse]


# -------------------------------------------------------------------------------------- registries of knobs
Scale = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
"""(centred (B,), x (B,), inverse (B,), eps) -> normalised (B,): how ``scale_rewards`` divides centred rewards;
register another with ``@SCALES.register("name")``."""

SCALES: Registry[Scale] = Registry("reward scale")


@SCALES.register("group")
def _scale_group(centred, x, inverse, eps):
    return centred / (_per_group(x, inverse, nanstd) + eps)


@SCALES.register("batch")
def _scale_batch(centred, x, inverse, eps):
    return centred / (np.full(x.shape, nanstd(x)) + eps)


@SCALES.register("none")
def _scale_none(centred, x, inverse, eps):
    return centred


def normalise(x: np.ndarray, inverse: np.ndarray, scale: str, eps: float = EPS) -> np.ndarray:
    """Centre by the group mean and divide by the ``scale`` std (+eps); NaN stays NaN."""
    return SCALES.get(scale)(x - _per_group(x, inverse, nanmean), x, inverse, eps)


def weighted_nansum(matrix: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k m_ik over the non-NaN entries of each row; NaN where a row has none. matrix (B, K)."""
    out = np.where(np.isnan(matrix), 0.0, matrix * weights[None, :]).sum(axis=1)  # a NaN weight stays NaN
    out[np.isnan(matrix).all(axis=1)] = np.nan
    return out


Aggregation = Callable[[np.ndarray, np.ndarray, np.ndarray, str, float], np.ndarray]
"""(scores (B, K), weights (K,), inverse (B,), scale_rewards, eps) -> advantages (B,), NaN = no score;
``multi_objective_aggregation``, register another with ``@AGGREGATIONS.register("name")``."""

AGGREGATIONS: Registry[Aggregation] = Registry("reward aggregation")


@AGGREGATIONS.register("sum_then_normalize")
def _sum_then_normalize(matrix, weights, inverse, scale, eps):
    return normalise(weighted_nansum(matrix, weights), inverse, scale, eps)


@AGGREGATIONS.register("normalize_then_sum")
def _normalize_then_sum(matrix, weights, inverse, scale, eps):
    z = np.stack([normalise(matrix[:, k], inverse, "group", eps) for k in range(matrix.shape[1])], axis=1)
    summed = weighted_nansum(z, weights)
    return (summed - nanmean(summed)) / (nanstd(summed) + eps)


def _zero_std_frac(rewards: np.ndarray, inverse: np.ndarray) -> float:
    ties = [np.isclose(nanstd(rewards[inverse == g]), 0.0) for g in range(inverse.max() + 1)] if rewards.size else []
    return float(np.mean(ties)) if ties else 0.0


def compute_advantages(
    scores: Dict[str, np.ndarray],
    weights: Dict[str, float],
    group_ids: np.ndarray,
    *,
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    clip: Optional[float] = None,
    eps: float = EPS,
    stat_tracker: Optional[PerPromptStatTracker] = None,
    prompts: Optional[Sequence[str]] = None,
) -> AdvantageResult:
    """Advantages of B samples from K rewards (see the module docstring for the math).

    scores: {name: (B,) floats, NaN = no score}; weights: {name: w} for every name in ``scores``;
    group_ids: (B,) ints, samples of one prompt share an id; prompts: (B,) the samples' prompts, needed with
    ``stat_tracker`` (which this call updates).
    """
    aggregate = AGGREGATIONS.get(aggregation)
    SCALES.get(scale_rewards)
    missing = [name for name in scores if name not in weights]
    if missing:
        raise ValueError(f"no weight for reward(s) {', '.join(missing)}")
    group_ids = np.asarray(group_ids)
    names = list(scores)
    matrix = np.stack([np.asarray(scores[n], dtype=np.float64).reshape(-1) for n in names], axis=1) if names else np.zeros((len(group_ids), 0))
    if matrix.shape[0] != len(group_ids):
        raise ValueError(f"scores have {matrix.shape[0]} samples but group_ids has {len(group_ids)}")
    matrix[np.isinf(matrix)] = np.nan  # not a score (the reward client already counts it as a failure)
    w = np.array([float(weights[n]) for n in names])
    _, inverse = np.unique(group_ids, return_inverse=True)

    rewards = weighted_nansum(matrix, w)
    if stat_tracker is not None:
        advantages = stat_tracker.update(prompts, rewards)
    else:
        advantages = aggregate(matrix, w, inverse, scale_rewards, eps)
    advantages = np.nan_to_num(advantages, nan=0.0)
    if clip is not None:
        advantages = np.clip(advantages, -clip, clip)
    zero_std_frac = _zero_std_frac(rewards, inverse)

    metrics = {"reward/mean": nanmean(rewards), "reward/std": nanstd(rewards)}
    for k, name in enumerate(names):
        metrics[f"reward/{name}/mean"] = nanmean(matrix[:, k])
        metrics[f"reward/{name}/std"] = nanstd(matrix[:, k])
        metrics[f"reward/{name}/missing_frac"] = float(np.isnan(matrix[:, k]).mean()) if len(matrix) else 0.0
    metrics["advantage/zero_std_frac"] = zero_std_frac
    metrics["advantage/mean_abs"] = float(np.abs(advantages).mean()) if advantages.size else 0.0
    return AdvantageResult(advantages.astype(np.float32), rewards, zero_std_frac, metrics)
