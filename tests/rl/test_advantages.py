"""Group advantages: exact math against a transcription of TRL 1.16's GRPO code, and NaN handling."""

import json

import numpy as np
import pytest
import torch

from tandem.rl.advantages import compute_advantages


def trl_nanstd(t: torch.Tensor, dim=None, keepdim=False) -> torch.Tensor:
    """trl.trainer.utils.nanstd (Bessel-corrected, NaN for fewer than two values)."""
    mean = torch.nanmean(t, dim=dim, keepdim=True)
    var = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(t), dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var)
    return std if keepdim else std.squeeze() if dim is None else std.squeeze(dim)


def trl_advantages(per_func: np.ndarray, weights: np.ndarray, G: int, aggregation: str, scale: str) -> np.ndarray:
    """The advantage block of trl/trainer/grpo_trainer.py (TRL 1.16), contiguous groups of size G."""
    r = torch.tensor(per_func, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    unscorable = torch.isnan(r).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (r * w[None]).nansum(dim=1)
        rewards[unscorable] = torch.nan
        mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
        std = trl_nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch" else trl_nanstd(rewards).expand_as(rewards)
        adv = rewards - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
    else:
        grouped = r.view(-1, G, r.shape[1])
        z = ((grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (trl_nanstd(grouped, dim=1, keepdim=True) + 1e-4)).view(-1, r.shape[1])
        rewards = (z * w[None]).nansum(dim=1)
        rewards[unscorable] = torch.nan
        adv = (rewards - torch.nanmean(rewards)) / (trl_nanstd(rewards) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).numpy()


@pytest.mark.parametrize(
    "aggregation, scale",
    [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
     ("normalize_then_sum", "group"), ("normalize_then_sum", "batch"), ("normalize_then_sum", "none")],
)
def test_matches_trl_without_nan(aggregation, scale):
    rng = np.random.default_rng(0)
    G, P = 4, 5
    a, b = rng.normal(size=G * P), rng.uniform(size=G * P)
    res = compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, np.repeat(np.arange(P), G), aggregation=aggregation, scale_rewards=scale)
    ref = trl_advantages(np.stack([a, b], 1), np.array([1.0, 0.5]), G, aggregation, scale)
    np.testing.assert_allclose(res.advantages, ref, rtol=1e-5, atol=1e-6)
    assert res.advantages.dtype == np.float32 and res.advantages.shape == (G * P,)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_matches_trl_with_nan(aggregation):
    nan = np.nan
    a = np.array([1.0, nan, 3.0, 0.0, nan, nan, nan, nan, 2.0, 2.0, 5.0, nan])
    b = np.array([0.5, 1.0, nan, 0.2, nan, nan, nan, nan, 1.0, 0.0, nan, nan])
    res = compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, np.repeat(np.arange(3), 4), aggregation=aggregation)
    ref = trl_advantages(np.stack([a, b], 1), np.array([1.0, 2.0]), 4, aggregation, "group")
    np.testing.assert_allclose(res.advantages, ref, rtol=1e-5, atol=1e-6)
    assert np.isfinite(res.advantages).all()
    assert (res.advantages[[4, 5, 6, 7, 11]] == 0).all()  # all-NaN group, and a sample with no score at all


def test_hand_computed_group_and_metrics():
    r = np.array([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    res = compute_advantages({"r": r}, {"r": 2.0}, np.array([7, 7, 7, 9, 9, 9]))
    # group 7: R = 2 r = [0, 2, 4], mean 2, std (ddof 1) 2; group 9 ties.
    np.testing.assert_allclose(res.advantages, [-2 / (2 + 1e-4), 0, 2 / (2 + 1e-4), 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(res.rewards, 2 * r)
    assert res.zero_std_frac == 0.5 and res.metrics["advantage/zero_std_frac"] == 0.5
    assert res.metrics["reward/mean"] == pytest.approx(np.mean(2 * r))
    assert res.metrics["reward/std"] == pytest.approx(np.std(2 * r, ddof=1))
    assert res.metrics["reward/r/mean"] == pytest.approx(r.mean())
    assert res.metrics["reward/r/std"] == pytest.approx(r.std(ddof=1))
    assert res.metrics["advantage/mean_abs"] == pytest.approx(np.abs(res.advantages).mean())


def test_interleaved_group_ids_equal_sorted():
    rng = np.random.default_rng(1)
    r, g = rng.normal(size=8), np.array([0, 1, 0, 1, 0, 1, 0, 1])
    res = compute_advantages({"r": r}, {"r": 1.0}, g)
    order = np.argsort(g, kind="stable")
    sorted_res = compute_advantages({"r": r[order]}, {"r": 1.0}, g[order])
    np.testing.assert_allclose(res.advantages[order], sorted_res.advantages)


def test_missing_scores_are_nan_safe_in_both_modes():
    nan = np.nan
    a = np.array([1.0, nan, 0.0, nan])
    b = np.array([nan, nan, 1.0, 3.0])
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        res = compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, np.zeros(4, int), aggregation=aggregation)
        assert np.isfinite(res.advantages).all()
        assert res.advantages[1] == 0.0  # nothing scored it
        assert np.isnan(res.rewards[1]) and res.rewards[0] == 1.0 and res.rewards[3] == 3.0
    assert compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, np.zeros(4, int)).metrics["reward/b/missing_frac"] == 0.5



def test_infinite_scores_are_no_score():
    inf = np.inf
    with_inf = compute_advantages({"r": np.array([inf, 1.0, 2.0, 3.0, -inf, 0.0])}, {"r": 1.0}, np.array([0, 0, 0, 0, 1, 1]))
    with_nan = compute_advantages({"r": np.array([np.nan, 1.0, 2.0, 3.0, np.nan, 0.0])}, {"r": 1.0}, np.array([0, 0, 0, 0, 1, 1]))
    np.testing.assert_array_equal(with_inf.advantages, with_nan.advantages)
    assert with_inf.advantages[1] < 0 < with_inf.advantages[3]  # the finite scores of the group still train
    assert with_inf.metrics == with_nan.metrics and with_inf.metrics["reward/r/missing_frac"] == 2 / 6
    assert np.isfinite(with_inf.metrics["reward/mean"])

def test_clip_and_scale_none():
    r = np.array([0.0, 0.0, 0.0, 100.0])
    res = compute_advantages({"r": r}, {"r": 1.0}, np.zeros(4, int), scale_rewards="none", clip=5.0)
    np.testing.assert_allclose(res.advantages, [-5, -5, -5, 5])
    unclipped = compute_advantages({"r": r}, {"r": 1.0}, np.zeros(4, int), scale_rewards="none")
    np.testing.assert_allclose(unclipped.advantages, r - 25.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_normalize_then_sum_always_divides_by_each_rewards_group_std(scale):
    """TRL 1.16 ignores scale_rewards under normalize_then_sum: each reward is standardised per group."""
    a, b = np.array([1.0, 3.0, 10.0, 20.0]), np.array([0.0, 1.0, 0.0, 0.0])
    res = compute_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, np.array([0, 0, 1, 1]), aggregation="normalize_then_sum", scale_rewards=scale)
    std_a = np.array([np.sqrt(2), np.sqrt(2), np.sqrt(50), np.sqrt(50)])  # ddof 1 within each group
    std_b = np.array([np.sqrt(0.5), np.sqrt(0.5), 0.0, 0.0])
    s = np.array([-1.0, 1.0, -5.0, 5.0]) / (std_a + 1e-4) + np.array([-0.5, 0.5, 0.0, 0.0]) / (std_b + 1e-4)
    np.testing.assert_allclose(res.advantages, (s - s.mean()) / (s.std(ddof=1) + 1e-4), rtol=1e-6)


def test_batch_scale_uses_batch_std_and_group_mean():
    r = np.array([0.0, 2.0, 10.0, 14.0])
    res = compute_advantages({"r": r}, {"r": 1.0}, np.array([0, 0, 1, 1]), scale_rewards="batch")
    std = np.std(r, ddof=1)
    np.testing.assert_allclose(res.advantages, np.array([-1, 1, -2, 2]) / (std + 1e-4), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="reward aggregation 'mean'; allowed reward aggregations: normalize_then_sum, "
                       "sum_then_normalize"):
        compute_advantages({"r": np.zeros(2)}, {"r": 1.0}, np.zeros(2, int), aggregation="mean")
    with pytest.raises(ValueError, match="reward scale 'global'; allowed reward scales: batch, group, none"):
        compute_advantages({"r": np.zeros(2)}, {"r": 1.0}, np.zeros(2, int), scale_rewards="global")
    with pytest.raises(ValueError, match="no weight for reward"):
        compute_advantages({"r": np.zeros(2)}, {}, np.zeros(2, int))


def ddpo_tracker_reference(batches, buffer_size, min_count):
    """DDPO's PerPromptStatTracker.update (ddpo_pytorch/stat_tracking.py) re-implemented, eps 1e-4 like flow_grpo."""
    from collections import deque

    stats, out = {}, []
    for prompts, rewards in batches:
        prompts, adv = np.array(prompts), np.empty_like(rewards)
        for p in np.unique(prompts):
            r = rewards[prompts == p]
            stats.setdefault(p, deque(maxlen=buffer_size)).extend(r)
            if len(stats[p]) < min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-4
            else:
                mean, std = np.mean(stats[p]), np.std(stats[p]) + 1e-4
            adv[prompts == p] = (r - mean) / std
        out.append(adv)
    return out


def test_per_prompt_stat_tracking_matches_ddpo_over_rollouts():
    from tandem.rl.stat_tracking import PerPromptStatTracker

    rng = np.random.default_rng(3)
    batches = []
    for _ in range(5):  # each prompt appears in some rollouts only, groups of 3
        prompts = list(np.repeat(rng.choice(["a", "b", "c", "d"], size=2, replace=False), 3))
        batches.append((prompts, rng.normal(size=6)))
    expected = ddpo_tracker_reference(batches, buffer_size=7, min_count=5)
    tracker = PerPromptStatTracker(buffer_size=7, min_count=5)
    for (prompts, rewards), ref in zip(batches, expected):
        res = compute_advantages({"r": rewards}, {"r": 1.0}, np.repeat(np.arange(2), 3), stat_tracker=tracker,
                                 prompts=prompts, clip=None)
        np.testing.assert_allclose(res.advantages, ref, rtol=1e-5, atol=1e-6)
    assert all(len(h) <= 7 for h in tracker.history.values())

    restored = PerPromptStatTracker(buffer_size=7, min_count=5)  # the checkpointed state is the whole state
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    prompts, rewards = ["a"] * 3 + ["b"] * 3, rng.normal(size=6)
    np.testing.assert_array_equal(restored.update(prompts, rewards), tracker.update(prompts, rewards))


def test_per_prompt_stat_tracking_skips_missing_scores():
    from tandem.rl.stat_tracking import PerPromptStatTracker

    tracker = PerPromptStatTracker(buffer_size=0, min_count=1)
    r = np.array([1.0, np.nan, 3.0, np.nan, np.nan, np.nan])
    res = compute_advantages({"r": r}, {"r": 1.0}, np.repeat(np.arange(2), 3), stat_tracker=tracker, prompts=["a"] * 3 + ["b"] * 3)
    np.testing.assert_allclose(res.advantages, [-1 / (1 + 1e-4), 0, 1 / (1 + 1e-4), 0, 0, 0], rtol=1e-6)
    assert tracker.history == {"a": [1.0, 3.0], "b": []}
