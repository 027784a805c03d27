"""reward_host.max_failed_frac with 2 processes (gloo): the failed share is that of the whole rollout, so a reward
failing on one process's samples stops every process at the same rollout, or none (tests/dist_failures.py)."""

import json

import pytest
from tests.dist_launch import run, torchrun

pytestmark = pytest.mark.slow  # a 2-process launch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 processes decided (rank 0's and rank 1's JSON)."""
    out = tmp_path_factory.mktemp("dist_failures")
    run(torchrun("tests/dist_failures.py", str(out)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_failures_are_counted_over_every_process(ranks):
    rank0, rank1 = ranks
    assert rank0 == rank1  # the same decision on both processes
    assert rank0["0.5"] == []  # 4 of 8 samples failed: not more than half (rank 1 alone: 4 of 4)
    [[rollout, message]] = rank0["0.25"]
    assert rollout == 1  # the second rollout in a row over the share, on both
    assert "failed on 4/8 samples" in message and "ValueError: boom in prompt" in message


def test_a_reward_that_scores_nothing_is_judged_on_the_whole_rollout(ranks):
    rank0, rank1 = ranks
    assert rank0 == rank1
    assert rank0["scores_only_boom"] == []  # rank 0's share has no score, rank 1's has: a signal, no stop
    [[rollout, message]] = rank0["nothing"]
    assert rollout == 1 and "reward 'nothing' scored none of the 8 samples" in message
