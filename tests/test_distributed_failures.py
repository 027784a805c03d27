"""reward_host.max_failed_frac with 2 processes (gloo): the failed share is that of the whole rollout, so a reward
failing on one process's samples stops every process at the same rollout, or none (tests/dist_failures.py)."""

import json

import pytest
from dist_launch import run, torchrun  # tests/ is on sys.path (pytest's rootdir-less test folder)

pytestmark = pytest.mark.slow  # a 2-process launch


def test_failures_are_counted_over_every_process(tmp_path):
    run(torchrun("tests/dist_failures.py", str(tmp_path)))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # the same decision on both processes
    assert rank0["0.5"] == []  # 4 of 8 samples failed: not more than half (rank 1 alone: 4 of 4)
    [[rollout, message]] = rank0["0.25"]
    assert rollout == 1  # the second rollout in a row over the share, on both
    assert "failed on 4/8 samples" in message and "ValueError: boom in prompt" in message
