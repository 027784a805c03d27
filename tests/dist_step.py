"""One GRPO optimizer step (SGD, lr 1) on a fixed batch, run by tests/test_distributed.py in 1 or 2 processes.

Every process builds the same rollout (same seed); with N processes each trains on its 1/N of the minibatch
and gradients are averaged across processes — all-reduced (ddp) or reduce-scattered by FSDP2 (fsdp, the
trained module sharded before the rollout, as the trainer does). Rank 0 writes the loss and the updated
(whole) weights of each case to OUT_DIR/CASE.safetensors. A case is STAGE-full|lora-ddp|fsdp; one launch runs
several, each with a fresh policy, so the processes start (and import) once.

    python tests/dist_step.py MODEL_DIR OUT_DIR CASE [CASE ...]                          (one process)
    torchrun --nproc_per_node 2 tests/dist_step.py MODEL_DIR OUT_DIR CASE [CASE ...]     (two processes, gloo)
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from tandem.rl.config import JobConfig, apply_stage_defaults
from tandem.core.dtensor import full_tensor
from tandem.rl.distributed import finish, layout_of, shard
from tandem.rl.session import build_policy
from tandem.rl.trainer import update_on_minibatch


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


if __name__ == "__main__":
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    for case in sys.argv[3:]:
        stage, tuning, strategy = case.split("-")
        step(accelerator, stage, model_dir, out_dir / f"{case}.safetensors", strategy, tuning == "lora")
    finish(accelerator)
