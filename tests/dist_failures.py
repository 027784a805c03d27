"""Reward failures counted over every process (tests/rl/test_distributed_failures.py), launched by torchrun with 2
processes (gloo): each process scores a rollout share of 4 samples with ``fails_on_boom``, which raises on rank 1's
prompts only (the whole rollout: 4 of 8 samples failed), and counts them as the trainer does,
``check_failures(layout.gather_rollout(scores, group_ids)[0])``, for up to 3 rollouts at ``max_failed_frac`` 0.5 and 0.25
(``max_failed_rollouts`` 2); and rewards that score only rank 1's prompts, or nothing (a reward that scores none of
the whole rollout counts). Each rank writes OUT_DIR/rank{R}.json: {case: [[rollout, error]] or []}.

    torchrun --nproc_per_node 2 tests/dist_failures.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from tandem.rewards.base import RewardError
from tandem.rewards.client import RewardClient
from tandem.rewards.config import RewardEntry, RewardHostConfig
from tandem.rl.config import JobConfig
from tandem.rl.distributed import finish, layout_of


def counted(layout, fn: str, frac: float) -> list:
    """[[rollout, error]] of the first of 3 rollouts that stops ``fn`` at ``max_failed_frac`` frac, or []."""
    prompt = "a boom" if layout.rank == 1 else "a cat"
    images = np.zeros((4, 8, 8, 3), np.uint8)
    host = RewardHostConfig(backend="local", max_failed_frac=frac, max_failed_rollouts=2)
    with RewardClient([RewardEntry(fn=f"tests.reward_plugins:{fn}")], host) as client:
        for rollout in range(3):
            scores = client.score(images, [prompt] * 4).result()
            try:
                client.check_failures(layout.gather_rollout(scores, np.arange(4))[0])
            except RewardError as e:
                return [[rollout, str(e)]]
    return []


def outcomes(layout) -> dict:
    out = {str(frac): counted(layout, "fails_on_boom", frac) for frac in (0.5, 0.25)}
    out["scores_only_boom"] = counted(layout, "scores_only_boom", 0.5)  # rank 0's share all None, rank 1's scored
    out["nothing"] = counted(layout, "nothing", 0.5)  # every share all None
    return out


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    layout = layout_of(accelerator, JobConfig(output_dir="unused"))
    result = outcomes(layout)
    (Path(sys.argv[1]) / f"rank{layout.rank}.json").write_text(json.dumps(result))
    finish(accelerator)
