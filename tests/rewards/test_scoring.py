"""Rewards that are not numbers: +-inf, strings and objects count as failures, and a reward that scores none
of a rollout's samples is stopped by the same reward_host.max_failed_* rule as one that raises."""

import numpy as np
import pytest

from tandem.rewards.base import RewardError
from tandem.rewards.client import RewardClient
from tandem.rewards.config import RewardEntry, RewardHostConfig
from tandem.rewards.scoring import FailureGuard

LOCAL = RewardHostConfig(backend="local", async_scoring=False)


def images(n=4):
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("fn, value", [("infinite", "inf"), ("as_text", "'0.5'")])
def test_values_that_are_not_numbers_count_as_failures(plugin_path, caplog, fn, value):
    with RewardClient([RewardEntry(fn=f"tests.reward_plugins:{fn}"), RewardEntry(name="brightness")], LOCAL) as client:
        with caplog.at_level("WARNING", logger="tandem.rewards"):
            scores = client.score(images(), ["p"] * 4).result()
    assert np.isnan(scores[fn]).all() and scores.failed[fn].all()
    assert not scores.failed["brightness"].any() and np.isfinite(scores["brightness"]).all()
    assert f"reward '{fn}' returned values that are not numbers for samples [0, 1, 2, 3] ({value}" in caplog.text
    assert scores.errors[fn] == f"returned {value}, not a number"


def test_a_reward_that_keeps_returning_non_numbers_stops(plugin_path):
    host = RewardHostConfig(backend="local", async_scoring=False, max_failed_rollouts=2)
    with RewardClient([RewardEntry(fn="tests.reward_plugins:infinite")], host) as client:
        client.check_failures(client.score(images(), ["p"] * 4).result())
        with pytest.raises(RewardError, match=r"reward 'infinite' failed on 4/4 samples .* first error: returned inf, not a number"):
            client.check_failures(client.score(images(), ["p"] * 4).result())


def test_a_reward_that_scores_nothing_stops_like_one_that_fails():
    guard = FailureGuard(max_frac=0.5, max_rollouts=2)
    none, some = np.full(4, np.nan), np.array([np.nan, np.nan, np.nan, 0.3])
    unfailed = np.zeros(4, bool)
    guard.observe({"r": unfailed}, {}, {"r": none})
    guard.observe({"r": unfailed}, {}, {"r": some})  # one score in four is a signal: the streak restarts
    guard.observe({"r": unfailed}, {}, {"r": none})
    with pytest.raises(RewardError, match=r"reward 'r' scored none of the 4 samples .* in 2 consecutive rollouts"):
        guard.observe({"r": unfailed}, {}, {"r": none})
