"""The 1-vs-2-process cases of tests/rl/test_distributed_equivalence.py, several per launch, so the processes start
(and import) once.

* ``step:STAGE-full|lora-ddp|fsdp`` — one GRPO optimizer step (SGD, lr 1) on a fixed batch. Every process builds
  the same rollout (same seed); with N processes each trains on its 1/N of the minibatch and gradients are
  averaged across processes — all-reduced (ddp) or reduce-scattered by FSDP2 (fsdp, the trained module sharded
  before the rollout, as the trainer does). Rank 0 writes the loss and the updated (whole) weights to
  OUT_DIR/step-CASE.safetensors.
* ``rollout:STAGE`` — one rollout batch through ``StageTrainer.rollout_and_score``: 2 prompts x 4 copies; with 2
  processes each rolls out 2 copies of each prompt. Rank 0 writes every process's samples (rank order) to
  OUT_DIR/rollout-STAGE.safetensors: old log-probs, advantages and group ids, and per stage
  - decoder (``same_noise_in_group``): latents around the trained steps (the first from the starting noise by ODE
    steps), the window's timesteps, the conditions' AR tokens;
  - ar: the sampled tokens and the seeds of the frozen decoder that renders them for the rewards.

Each case starts from a fresh policy.

    python tests/dist_cases.py MODEL_DIR OUT_DIR CASE [CASE ...]                          (one process)
    torchrun --nproc_per_node 2 tests/dist_cases.py MODEL_DIR OUT_DIR CASE [CASE ...]     (two processes, gloo)
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from tandem.core.dtensor import full_tensor
from tandem.core.types import PromptRecord
from tandem.rewards.client import RewardClient
from tandem.rewards.config import RewardEntry
from tandem.rl.config import JobConfig, apply_stage_defaults
from tandem.rl.distributed import finish, layout_of, shard
from tandem.rl.run_state import RunState
from tandem.rl.session import build_policy
from tandem.rl.trainer import StageTrainer, update_on_minibatch


def step(accelerator, stage: str, model_dir: str, out: Path, strategy: str, lora: bool) -> None:
    torch.manual_seed(0)
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.distributed.strategy, cfg.optim.lora.enabled = model_dir, strategy, lora
    apply_stage_defaults(cfg, stage)
    cfg.decoder.num_steps, cfg.grpo.mini_batch_size, cfg.grpo.num_generations = 6, 8, 4
    cfg.grpo.beta = 0.1  # the KL term runs the reference: the LoRA-disabled model, or the frozen full copy
    cfg.optim.max_grad_norm = 0.05  # the clip is active: it must use the global gradient norm
    layout = layout_of(accelerator, cfg)
    policy = build_policy(stage, cfg)
    if layout.sharded:
        shard(policy, layout)
        reference = policy.reference if stage == "decoder" else policy._ref_model
        assert lora or not any(isinstance(p, DTensor) for p in reference.parameters()), "the frozen reference was sharded"
    batch = policy.rollout(["a red apple", 'a sign "OPEN"'], [{}, {}], group_size=4, seed=3)
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.75, 0.0])
    mine = layout.local_slice(len(batch) // layout.world)
    # plain SGD with lr 1: the weight change is the averaged gradient itself (Adam's first step is sign-like and
    # would amplify float noise in near-zero gradients)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    metrics = update_on_minibatch(policy, optimizer, batch.select(torch.arange(len(batch))[mine]), cfg, accelerator, layout)
    weights = {n: full_tensor(p.detach()).clone() for n, p in policy.trainable_named_parameters()}  # collective
    if layout.is_main:
        save_file(weights, str(out), metadata={"metrics": json.dumps(metrics), "world": str(layout.world)})


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
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    for case in sys.argv[3:]:
        kind, name = case.split(":")
        out = out_dir / f"{kind}-{name}.safetensors"
        if kind == "step":
            stage, tuning, strategy = name.split("-")
            step(accelerator, stage, model_dir, out, strategy, tuning == "lora")
        else:
            rollout(accelerator, name, model_dir, out)
    finish(accelerator)
