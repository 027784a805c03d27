"""One rollout batch of a stage through ``StageTrainer.rollout_and_score``, in 1 or 2 processes
(tests/test_distributed.py).

2 prompts x 4 copies; with 2 processes each rolls out 2 copies of each prompt. Rank 0 writes every process's
samples (rank order) to OUT_DIR/STAGE.safetensors: old log-probs, advantages and group ids, and per stage
* decoder (``same_noise_in_group``): latents around the trained steps (the first from the starting noise by ODE
  steps), the window's timesteps, the conditions' AR tokens;
* ar: the sampled tokens and the seeds of the frozen decoder that renders them for the rewards.

    python tests/dist_rollout.py MODEL_DIR OUT_DIR STAGE [STAGE ...]
    torchrun --nproc_per_node 2 tests/dist_rollout.py MODEL_DIR OUT_DIR STAGE [STAGE ...]
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from tandem.core.types import PromptRecord
from tandem.rewards.client import RewardClient
from tandem.rewards.config import RewardEntry
from tandem.rl.config import JobConfig, apply_stage_defaults
from tandem.rl.distributed import finish, layout_of
from tandem.rl.run_state import RunState
from tandem.rl.session import build_policy
from tandem.rl.trainer import StageTrainer


def rollout(accelerator, stage: str, model_dir: str, out: Path) -> None:
    torch.manual_seed(0)
    cfg = JobConfig(output_dir="unused", seed=5)
    cfg.model.path = model_dir
    apply_stage_defaults(cfg, stage)
    cfg.decoder.num_steps, cfg.decoder.same_noise_in_group = 6, True
    cfg.grpo.num_generations, cfg.grpo.prompts_per_step, cfg.grpo.mini_batch_size = 4, 2, 8
    cfg.rewards, cfg.reward_host.backend = [RewardEntry(name="brightness")], "local"
    layout = layout_of(accelerator, cfg)
    policy = build_policy(stage, cfg)
    records = [PromptRecord("a red apple", {}), PromptRecord('a sign "OPEN"', {})]
    with RewardClient(cfg.rewards, cfg.reward_host) as rewards:
        trainer = StageTrainer(stage, cfg, policy, rewards, None, accelerator, RunState(), records, cfg.max_steps)
        trainer.rollout_and_score()  # a second rollout batch: its seed differs from the first's
        subs = trainer.rollout_and_score().subs
    if stage == "decoder":
        mine = {k: torch.cat([s.extras[k] for s in subs]) for k in ("latents", "next_latents", "timesteps")}
        mine["full_tokens"] = torch.cat([s.extras["cond"]["full_tokens"] for s in subs])
    else:
        mine = {k: torch.cat([s.extras[k] for s in subs]) for k in ("tokens", "decode_seeds")}
    mine.update(old_log_probs=torch.cat([s.old_log_probs for s in subs]), advantages=torch.cat([s.advantages for s in subs]),
                group_ids=torch.cat([torch.as_tensor(s.group_ids) for s in subs]))
    parts = [mine]
    if layout.world > 1:
        parts = [None] * layout.world
        torch.distributed.all_gather_object(parts, mine)
    if layout.is_main:
        save_file({k: torch.cat([p[k] for p in parts]).contiguous() for k in mine}, str(out))


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    for stage in sys.argv[3:]:
        rollout(accelerator, stage, sys.argv[1], Path(sys.argv[2]) / f"{stage}.safetensors")
    finish(accelerator)
