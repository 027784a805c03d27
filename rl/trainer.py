"""The one GRPO loop, for both stages (AR tokens and decoder denoising steps).

Each rollout batch goes through numbered phases:

1. sample prompts — ``grpo.prompts_per_step`` prompts from the seeded prompt sampler;
2. rollout — the policy samples ``grpo.num_generations`` copies of each (copies adjacent), no grad;
3. score — the images go once into the Ray object store; every reward actor scores the same object;
4. advantages — A = (R - mean_group) / (std + 1e-4), NaN-safe, optionally clipped (TRL / flow_grpo);
5. update — ``grpo.num_iterations`` epochs over minibatches of ``grpo.mini_batch_size`` samples; one optimizer
   step per minibatch; the policy's ``unit_chunks`` are backpropagated one at a time (gradient accumulation
   over the denoising steps of the flow policy), each chunk's loss weighted by its share of the units;
6. log / sample grid / checkpoint — one metrics.jsonl line per optimizer step.

Every optimizer step logs the reward statistics of the rollout it trains on. ``time/rollout_s`` and
``time/reward_s`` are charged to the first optimizer step of their rollout (0 on the others), so they sum
to the run's totals.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from rl.advantages import compute_advantages
from rl.checkpoint import save_checkpoint
from rl.config import JobConfig
from rl.data import PromptSampler, load_prompts
from rl.losses import policy_loss
from rl.run_dir import RunDir
from rl.types import Rollout

log = logging.getLogger("tandem.trainer")


def build_policy(stage: str, cfg: JobConfig):
    """The policy of ``stage`` over the GLM-Image pipeline at ``model.path``."""
    from policies import POLICIES
    from policies.glm_image import load_pipeline

    pipe = load_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.create_tiny_if_missing)
    return POLICIES[stage](pipe, cfg)


def minibatches(batch_size: int, mini_batch_size: int) -> List[torch.Tensor]:
    """Contiguous minibatches — the same layout the rollout used, so the first ratio is exactly 1."""
    return [torch.arange(s, min(s + mini_batch_size, batch_size)) for s in range(0, batch_size, mini_batch_size)]


def update_on_minibatch(policy, optimizer, batch: Rollout, cfg: JobConfig, accelerator) -> Dict[str, float]:
    """One optimizer step on ``batch``: chunked forward/backward, clip, step. Returns loss metrics."""
    g = cfg.grpo
    num_units = batch.old_log_probs.shape[1]
    optimizer.zero_grad(set_to_none=True)
    chunk_metrics = []
    for chunk in policy.unit_chunks(batch):
        with accelerator.autocast():
            out = policy.log_probs(batch, chunk, with_kl=g.beta > 0)
        loss, metrics = policy_loss(
            out.log_probs, batch.old_log_probs[:, chunk], batch.advantages, batch.mask[:, chunk],
            epsilon_low=g.epsilon, epsilon_high=g.epsilon_high, loss_type=g.loss_type, kl=out.kl, beta=g.beta,
        )
        share = (chunk.stop - chunk.start) / num_units
        accelerator.backward(loss * share)
        chunk_metrics.append((share, metrics))
    params = policy.trainable_parameters()
    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    optimizer.step()
    policy.on_optimizer_step()
    merged = {k: float(sum(w * m[k] for w, m in chunk_metrics)) for k in chunk_metrics[0][1]}
    merged["ratio/min"] = min(m["ratio/min"] for _, m in chunk_metrics)
    merged["ratio/max"] = max(m["ratio/max"] for _, m in chunk_metrics)
    merged["grad_norm"] = float(grad_norm)
    return merged


def train(cfg: JobConfig, stage: str) -> Path:
    from accelerate import Accelerator

    from rewards.base import check_entries
    from rewards.client import RewardClient

    check_entries(cfg.rewards)  # unknown rewards fail before any model is loaded
    torch.manual_seed(cfg.seed)
    g = cfg.grpo
    records = load_prompts(cfg.data.prompts, (cfg.data.height, cfg.data.width))
    sampler = PromptSampler(records, cfg.seed, cfg.data.shuffle)
    policy = build_policy(stage, cfg)
    # accelerate owns precision: rollout and training forwards run under the same autocast, so the first
    # on-policy ratio stays exactly 1 in bf16 too.
    accelerator = Accelerator(mixed_precision=cfg.optim.mixed_precision, cpu=policy.adapter.device.type == "cpu")
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.learning_rate,
                                  weight_decay=cfg.optim.weight_decay)
    grid_records = records[: min(len(records), 4)]
    with RewardClient(cfg.rewards, cfg.reward_host) as rewards:
        run = RunDir(cfg.output_dir).create(cfg)
        progress = _progress(cfg)
        step, rollout_index = 0, 0
        while step < cfg.max_steps:
            # 1. sample prompts
            chosen = sampler.next_batch(g.prompts_per_step)
            # 2. rollout (no grad)
            t0 = time.perf_counter()
            with accelerator.autocast():
                batch = policy.rollout([r.prompt for r in chosen], [r.metadata for r in chosen], g.num_generations,
                                       seed=cfg.seed * 1_000_003 + rollout_index)
            t1 = time.perf_counter()
            # 3. score on the reward actors
            scores = rewards.score(batch.images, batch.prompts, batch.metadata, batch.group_ids).result()
            t2 = time.perf_counter()
            # 4. advantages
            adv = compute_advantages(scores.scores, scores.weights, batch.group_ids,
                                     aggregation=g.multi_objective_aggregation, scale_rewards=g.scale_rewards,
                                     clip=g.adv_clip_max)
            batch.advantages = torch.as_tensor(np.asarray(adv.advantages), dtype=torch.float32)
            # 5. update: num_iterations epochs over minibatches
            timings = {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}
            for _ in range(g.num_iterations):
                for index in minibatches(len(batch), g.mini_batch_size):
                    if step >= cfg.max_steps:
                        break
                    t3 = time.perf_counter()
                    loss_metrics = update_on_minibatch(policy, optimizer, batch.select(index), cfg, accelerator)
                    step += 1
                    # 6. log / sample grid / checkpoint
                    metrics = {"step": step, "rollout": rollout_index, **adv.metrics, **loss_metrics, **timings,
                               "time/train_s": time.perf_counter() - t3}
                    timings = {"time/rollout_s": 0.0, "time/reward_s": 0.0}
                    run.log_metrics(metrics)
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.2e}")
                    _periodic(cfg, run, policy, optimizer, sampler, step, grid_records)
            rollout_index += 1
        progress.close()
    run.plot_rewards()
    return run.path


def _progress(cfg: JobConfig):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, desc="train", disable=not cfg.logging.progress, dynamic_ncols=True)


def _periodic(cfg: JobConfig, run: RunDir, policy, optimizer, sampler, step: int, grid_records) -> None:
    last = step == cfg.max_steps
    every = cfg.logging
    if last or (every.sample_every and step % every.sample_every == 0):
        prompts = [r.prompt for r in grid_records]
        images = policy.sample(prompts, [r.metadata for r in grid_records], seed=cfg.seed)
        run.save_grid(f"step_{step:06d}", images, prompts)
    if last or (every.checkpoint_every and step % every.checkpoint_every == 0):
        save_checkpoint(run.checkpoints, policy, optimizer, step, {"sampler": sampler.state_dict()})
    if every.sample_every and step % every.sample_every == 0:
        run.plot_rewards()
