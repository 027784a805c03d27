"""Data-parallel GRPO across processes (accelerate / torchrun / Ray Train workers), over torch.distributed.

The group sampler spreads each prompt's ``num_generations`` copies over the N processes: every process draws
the same prompts (same seed) and rolls out ``num_generations / N`` copies of each, seeded per group and per
copy (``tandem.core.seeds``), so a group's copies share its SDE window, conditions and shared noise on every
process, and the N processes sample what one process would. Rewards are all-gathered so that advantages are computed over whole groups — the same advantages a
single process would compute — and each process keeps those of its own samples. Gradients are averaged
across processes after each minibatch's backward (what DDP does), so every process applies the same update
and the weights stay identical; a minibatch of ``grpo.mini_batch_size`` samples is split N ways.

Two strategies (``distributed.strategy``), the same updates:

* ``ddp`` — every process holds the whole trained module; ``Layout.average_gradients`` all-reduces the
  gradients after backward.
* ``fsdp`` — ``shard`` (FSDP2, ``torch.distributed.fsdp.fully_shard``) shards the policy's ``trained_module``
  in place before the optimizer is built: one FSDP group per repeated block (the model's ``_repeated_blocks``,
  else transformers' ``_no_split_modules``: the DiT's transformer blocks, the AR model's text
  decoder layers), then the root for the rest. Each process keeps 1/N of every parameter, gradient and AdamW
  state; a block's weights are all-gathered for its forward and its gradients reduce-scattered (averaged) in
  backward, so ``average_gradients`` leaves those DTensor gradients alone, and gradient clipping over them
  gives the global norm. The module keeps its class and attributes (``fully_shard`` works in place), so the
  policies call it unchanged; copies made before sharding (the frozen KL reference of full fine-tuning) stay
  plain full modules. LoRA works: FSDP2 shards frozen base weights and trained adapters in one group.
  Checkpoints gather full tensors (``full_tensor``) and are the same files as with ``ddp``.

  Every forward of a sharded module is collective: all processes run the same rollouts, sample grids and
  eval images (only the main process scores and writes them). Code that calls submodules of a sharded model
  outside its forward (a token sampler that refuses ``fsdp`` in its rules, ``policies.token_samplers``; in a joint job,
  the AR model's VQ tokenizer for ``decoder.condition_source: reference``) is not supported under ``fsdp``.

  accelerate's own FSDP2 support is not used: accelerate 1.15 turns it on only for accelerator devices (on
  CPU / gloo it silently falls back to DDP and wraps the module in ``DistributedDataParallel``), and its
  ``prepare`` wants the model and optimizer together; calling ``fully_shard`` here is a few lines and runs
  the same on CPU (tests) and GPU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from tandem.rl.config import ConfigError, JobConfig

if TYPE_CHECKING:
    from tandem.rewards.client import RewardScores


@dataclass
class Layout:
    """This process's share of the rollout batch."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False
    device: torch.device = torch.device("cpu")  # where this process's collectives run (NCCL takes GPU tensors only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The trained module is sharded over the processes: its forward passes are collective."""
        return self.fsdp and self.world > 1

    def local_sizes(self, cfg: JobConfig):
        """(copies of each prompt, minibatch size) on this process; both must split evenly."""
        g = cfg.grpo
        for key, value in (("grpo.num_generations", g.num_generations), ("grpo.mini_batch_size", g.mini_batch_size)):
            if value % self.world:
                raise ConfigError(f"config key '{key}' is {value}; with {self.world} processes it must be a multiple of {self.world}")
        return g.num_generations // self.world, g.mini_batch_size // self.world

    def gather_rollout(self, local: "RewardScores", group_ids: np.ndarray):
        """The whole rollout's rewards and group ids, identical on every process, in one all-gather: each reward's
        ``scores`` and ``failed`` (B,) of every process concatenated in rank order, its first error (lowest rank),
        and the group ids (B,) likewise. The advantages are computed from these scores, and
        ``RewardClient.check_failures`` of them counts ``reward_host.max_failed_frac`` (and whether a reward scored
        anything) over all samples, so a reward failing on one process's share stops every process at the same
        rollout (not that one alone, leaving the others waiting in a collective)."""
        if self.world == 1:
            return local, group_ids
        n = len(group_ids)
        parts: List = [None] * self.world
        torch.distributed.all_gather_object(parts, (n, local.failed, local.errors, local.scores, group_ids))
        names = list(dict.fromkeys(name for _, failed, _, _, _ in parts for name in failed))
        failed = {name: np.concatenate([f.get(name, np.zeros(k, dtype=bool)) for k, f, _, _, _ in parts])
                  for name in names}
        errors = {name: next((e[name] for _, _, e, _, _ in parts if e.get(name)), None)
                  for name in dict.fromkeys(name for _, _, e, _, _ in parts for name in e)}
        scores = {name: np.concatenate([s.get(name, np.full(k, np.nan)) for k, _, _, s, _ in parts])
                  for name in dict.fromkeys(name for _, _, _, s, _ in parts for name in s)}
        whole = dataclasses.replace(local, scores=scores, failed=failed, errors=errors)
        return whole, np.concatenate([p[4] for p in parts])

    def broadcast(self, obj):
        """The main process's ``obj`` (any picklable value) on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def local_slice(self, n_local: int) -> slice:
        return slice(self.rank * n_local, (self.rank + 1) * n_local)

    def average_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """grad <- mean over processes (one flat all-reduce); FSDP's sharded gradients are averaged already."""
        params = [p for p in params if not isinstance(p, DTensor)]
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Loss metrics averaged over processes (min/max keep their extremes)."""
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        lo, hi = t.clone(), t.clone()
        torch.distributed.all_reduce(t)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        t /= self.world
        pick = {k: (lo if k.endswith("/min") else hi if k.endswith("/max") else t)[i].item() for i, k in enumerate(keys)}
        return pick


def launch_rank() -> int:
    """This process's rank before the accelerator exists: torch.distributed's when initialised (Ray Train
    workers), else ``$RANK`` (torchrun, accelerate launch), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def layout_of(accelerator, cfg: JobConfig) -> Layout:
    return Layout(rank=accelerator.process_index, world=accelerator.num_processes,
                  fsdp=cfg.distributed.strategy == "fsdp", device=accelerator.device)


def finish(accelerator) -> None:
    """End of a data-parallel job: wait for every process, then destroy the process group, so that no process
    leaves the group while another's last collective is still running."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.state.destroy_process_group()


def shard(policy, layout: Layout) -> None:
    """FSDP2: shard ``policy.trained_module`` in place over the processes, each repeated block then the root.
    Call before building the optimizer (it must hold the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = policy.trained_module
    names = set(getattr(module, "_repeated_blocks", None) or getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"distributed.strategy=fsdp: {type(module).__name__} names no repeated blocks to shard "
                          f"(_repeated_blocks / _no_split_modules); use distributed.strategy=ddp")
    mesh = init_device_mesh(next(module.parameters()).device.type, (layout.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # the root reshards after forward too (by default it stays gathered until backward): after a no-grad forward
    # (rollout, sample grid) it would otherwise keep exposing gathered copies that the optimizer and EMA miss
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    if getattr(policy, "ema", None) is not None:
        policy.ema.shard_like(policy.trainable_parameters())

