"""One flow-GRPO optimizer step (SGD, lr 1) on a fixed batch, run by tests/test_distributed.py in 1 or 2 processes.

Every process builds the same rollout (same seed); with N processes each trains on its 1/N of the minibatch
and gradients are averaged across processes. Rank 0 writes the loss and the updated weights.

    python tests/dist_step.py MODEL_DIR OUT.safetensors          (one process)
    torchrun --nproc_per_node 2 tests/dist_step.py MODEL_DIR OUT (two processes, gloo)
"""

import json
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from policies.flow import FlowPolicy
from policies.glm_image import load_pipeline
from rl.config import JobConfig, apply_stage_defaults
from rl.distributed import layout_of
from rl.trainer import update_on_minibatch


def main(model_dir: str, out: str) -> None:
    torch.manual_seed(0)
    cfg = JobConfig(output_dir="unused")
    cfg.model.path = model_dir
    apply_stage_defaults(cfg, "decoder")
    cfg.decoder.num_steps, cfg.grpo.mini_batch_size, cfg.grpo.num_generations = 6, 8, 4
    accelerator = Accelerator(cpu=True)
    layout = layout_of(accelerator)
    policy = FlowPolicy(load_pipeline(model_dir), cfg)
    batch = policy.rollout(["a red apple", 'a sign "OPEN"'], [{}, {}], group_size=4, seed=3)
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.75, 0.0])
    mine = layout.local_slice(len(batch) // layout.world)
    # plain SGD with lr 1: the weight change is the averaged gradient itself (Adam's first step is sign-like and
    # would amplify float noise in near-zero gradients)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    metrics = update_on_minibatch(policy, optimizer, batch.select(torch.arange(len(batch))[mine]), cfg, accelerator, layout)
    if layout.is_main:
        weights = {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}
        save_file(weights, out, metadata={"metrics": json.dumps(metrics), "world": str(layout.world)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
