"""The one GRPO loop, for both stages (AR tokens and decoder denoising steps), and the joint schedule.

Each rollout batch goes through numbered phases (``StageTrainer.train_rollout``):

1. sample prompts — ``grpo.prompts_per_step`` prompts from the seeded prompt sampler;
2. rollout + score — the policy samples ``grpo.num_generations`` copies of each prompt (copies adjacent),
   in sub-batches of whole groups the size of a minibatch; each sub-batch's images go once into the Ray
   object store and are scored while the next sub-batch rolls out (``reward_host.async_scoring``). Every
   sub-batch is sampled by the current weights, so what is trained stays on-policy;
3. advantages — A = (R - mean_group) / (std + 1e-4) over the whole batch, NaN-safe, optionally clipped;
4. buffer — AR rollouts are saved as shards when ``buffer.save`` (the decoder stage reads them back);
5. update — ``grpo.num_iterations`` epochs over the minibatches (= the sub-batches, same batch layout as the
   rollout, so the first ratio is exactly 1); one optimizer step each; the policy's ``unit_chunks`` are
   backpropagated one at a time (gradient accumulation over the denoising steps of the flow policy), each
   chunk's loss weighted by its share of the units;
6. log / sample grid / eval / checkpoint — one metrics.jsonl line per optimizer step.

Each optimizer step logs the reward statistics of the rollout it trains on. ``time/rollout_s`` and
``time/reward_s`` (the scoring time not hidden behind rollouts) are charged to the first optimizer step of
their rollout (0 on the others), so they sum to the run's totals. ``cost/*`` is the cost meter: wall-clock
(and GPU) seconds per unit of reward gained since the first rollout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from tandem.rewards.client import RewardScores
from tandem.rl.advantages import compute_advantages
from tandem.rl.buffer import load_buffer_records, save_shard
from tandem.rl.checkpoint import find_resume_point, read_state, restore, save_checkpoint
from tandem.rl.config import ConfigError, JobConfig, phase_config
from tandem.core.data import load_prompts
from tandem.core.types import PromptRecord, Rollout
from tandem.rl.data import PromptSampler
from tandem.rl.distributed import Layout, finish, layout_of, shard
from tandem.rl.losses import policy_loss
from tandem.rl.run_dir import RunDir

log = logging.getLogger("tandem.trainer")


def build_policy(stage: str, cfg: JobConfig, pipe=None):
    """The policy of ``stage`` over the GLM-Image pipeline at ``model.path`` (or the given ``pipe``)."""
    from tandem.policies import POLICIES
    from tandem.policies.glm_image import load_pipeline

    if pipe is None:
        pipe = load_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.create_tiny_if_missing)
    return POLICIES[stage](pipe, cfg)


def training_records(cfg: JobConfig, stage: str) -> List[PromptRecord]:
    size = (cfg.data.height, cfg.data.width)
    if stage == "decoder" and cfg.decoder.condition_source == "buffer":
        return load_buffer_records(cfg.decoder.buffer_dir, *size)
    return load_prompts(cfg.data.prompts, size)


def update_on_minibatch(policy, optimizer, batch: Rollout, cfg: JobConfig, accelerator,
                        layout: Layout = Layout()) -> Dict[str, float]:
    """One optimizer step on ``batch`` (this process's share of the minibatch): chunked forward/backward,
    gradients averaged over processes (by FSDP's reduce-scatter when sharded), clip to the global norm, step.
    Returns loss metrics averaged over processes."""
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
    layout.average_gradients(policy.trainable_parameters())
    grad_norm = accelerator.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm)
    optimizer.step()
    policy.on_optimizer_step()
    merged = {k: float(sum(w * m[k] for w, m in chunk_metrics)) for k in chunk_metrics[0][1]}
    merged["ratio/min"] = min(m["ratio/min"] for _, m in chunk_metrics)
    merged["ratio/max"] = max(m["ratio/max"] for _, m in chunk_metrics)
    merged["grad_norm"] = float(grad_norm)
    return layout.mean(merged)


def concat_scores(parts) -> Dict[str, np.ndarray]:
    return {name: np.concatenate([p.scores[name] for p in parts]) for name in parts[0].scores}


@dataclass
class RunState:
    """What a checkpoint restores besides weights: the global step and rollout count, and the cost meter."""

    step: int = 0
    rollouts: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0
    first_reward: Optional[float] = None
    reward_ema: Optional[float] = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def cost_metrics(self, reward_mean: float) -> Dict[str, float]:
        """cost/s_per_reward = elapsed seconds / (EMA(0.9) of reward/mean - the first rollout's reward)."""
        if self.first_reward is None:
            self.first_reward = self.reward_ema = reward_mean
        self.reward_ema = 0.9 * self.reward_ema + 0.1 * reward_mean
        gain, elapsed = self.reward_ema - self.first_reward, self.elapsed()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"cost/elapsed_s": elapsed, "cost/gpu_s": elapsed * gpus, "cost/reward_gain": gain,
                "cost/s_per_reward": elapsed / gain if gain > 0 else None}

    def to_dict(self) -> Dict:
        return {"step": self.step, "rollouts": self.rollouts, "elapsed": self.elapsed(),
                "first_reward": self.first_reward, "reward_ema": self.reward_ema}

    def load(self, d: Dict) -> None:
        self.step, self.rollouts, self.elapsed_before = d["step"], d["rollouts"], d["elapsed"]
        self.first_reward, self.reward_ema = d["first_reward"], d["reward_ema"]
        self.started = time.perf_counter()


class StageTrainer:
    """GRPO on one stage: a policy, its optimizer and prompt stream; the rewards and run dir are shared."""

    def __init__(self, stage: str, cfg: JobConfig, policy, rewards, run: RunDir, accelerator, state: RunState,
                 records: Optional[List[PromptRecord]] = None):
        self.stage, self.cfg, self.policy, self.rewards, self.run = stage, cfg, policy, rewards, run
        self.accelerator, self.state, self.layout = accelerator, state, layout_of(accelerator, cfg)
        self.copies, self.mini_batch = self.layout.local_sizes(cfg)
        if self.layout.sharded:  # before the optimizer, which must hold the sharded parameters
            shard(policy, self.layout)
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.learning_rate,
                                           weight_decay=cfg.optim.weight_decay)
        self.records = records if records is not None else training_records(cfg, stage)
        self.sampler = PromptSampler(self.records, cfg.seed, cfg.data.shuffle)
        self.latest_ar_records: List[PromptRecord] = []  # filled by AR rollouts (joint schedule)

    # -------------------------------------------------------------------------------- phases 1-3
    def _sub_batches(self, chosen: List[PromptRecord]) -> List[List[PromptRecord]]:
        per_sub = self.mini_batch // self.copies if self.mini_batch % self.copies == 0 else 0
        if per_sub == 0:  # minibatches split groups: one rollout call, scored after it
            return [chosen]
        return [chosen[i:i + per_sub] for i in range(0, len(chosen), per_sub)]

    def rollout_and_score(self):
        g, cfg, layout = self.cfg.grpo, self.cfg, self.layout
        chosen = self.sampler.next_batch(g.prompts_per_step)  # 1. sample prompts (the same on every process)
        base_seed = cfg.seed * 1_000_003 + self.state.rollouts
        subs, futures, rollout_s, reward_s = [], [], 0.0, 0.0
        for i, part in enumerate(self._sub_batches(chosen)):  # 2. rollout + score, overlapped
            t0 = time.perf_counter()
            with self.accelerator.autocast():
                sub = self.policy.rollout([r.prompt for r in part], [r.metadata for r in part], self.copies,
                                          seed=(base_seed * 101 + i) * layout.world + layout.rank)
            rollout_s += time.perf_counter() - t0
            sub.group_ids = sub.group_ids + sum(len(s) for s in subs) // self.copies
            t1 = time.perf_counter()
            future = self.rewards.score(sub.images, sub.prompts, sub.metadata, sub.group_ids)
            if not cfg.reward_host.async_scoring:
                future.result()
            reward_s += time.perf_counter() - t1
            subs.append(sub)
            futures.append(future)
        t1 = time.perf_counter()
        parts = [f.result() for f in futures]
        reward_s += time.perf_counter() - t1
        local_scores, local_groups = concat_scores(parts), np.concatenate([s.group_ids for s in subs])
        scores, group_ids = layout.gather_groups(local_scores, local_groups)  # whole groups from every process
        adv = compute_advantages(scores, parts[0].weights, group_ids,  # 3. advantages
                                 aggregation=g.multi_objective_aggregation, scale_rewards=g.scale_rewards,
                                 clip=g.adv_clip_max)
        mine = layout.local_slice(len(local_groups))
        local_advantages = np.asarray(adv.advantages)[mine]
        advantages = torch.as_tensor(local_advantages, dtype=torch.float32, device=subs[0].old_log_probs.device)
        offset = 0
        for sub in subs:
            sub.advantages = advantages[offset:offset + len(sub)]
            offset += len(sub)
        if self.stage == "ar":  # 4. the shared buffer
            self._keep_ar_rollouts(subs, RewardScores(local_scores, parts[0].weights), local_advantages,
                                   np.asarray(adv.rewards)[mine])
        return subs, adv, {"time/rollout_s": rollout_s, "time/reward_s": reward_s}

    def _keep_ar_rollouts(self, subs: List[Rollout], scores: RewardScores, advantages: np.ndarray, combined: np.ndarray) -> None:
        grid = (self.policy.grids.th, self.policy.grids.tw)
        self.latest_ar_records = [
            PromptRecord(p, dict(m, full_tokens=t.cpu().numpy()))
            for s in subs for p, m, t in zip(s.prompts, s.metadata, s.extras["full_tokens"])
        ]
        if self.cfg.buffer.save:  # each process writes its own samples
            whole = Rollout(
                images=np.concatenate([s.images for s in subs]), prompts=[p for s in subs for p in s.prompts],
                metadata=[m for s in subs for m in s.metadata], group_ids=np.concatenate([s.group_ids for s in subs]),
                old_log_probs=torch.empty(0), mask=torch.empty(0),
                extras={"full_tokens": torch.cat([s.extras["full_tokens"] for s in subs])},
            )
            index = self.state.rollouts * self.layout.world + self.layout.rank
            save_shard(self.run.path / "buffer", index, whole, scores, advantages, combined, self.cfg.data.height,
                       self.cfg.data.width, grid)

    # -------------------------------------------------------------------------------- phases 5-6
    def train_rollout(self, stop_at: int, hooks) -> None:
        """One rollout batch and its updates; stops early at global step ``stop_at``."""
        subs, adv, timings = self.rollout_and_score()
        for _ in range(self.cfg.grpo.num_iterations):  # 5. update
            for sub in subs:
                for index in _minibatches(len(sub), self.mini_batch):
                    if self.state.step >= stop_at:
                        break
                    t0 = time.perf_counter()
                    loss_metrics = update_on_minibatch(self.policy, self.optimizer, sub.select(index), self.cfg,
                                                       self.accelerator, self.layout)
                    self.state.step += 1
                    metrics = {"step": self.state.step, "phase": self.stage, "rollout": self.state.rollouts,
                               **adv.metrics, **loss_metrics, **timings, "time/train_s": time.perf_counter() - t0}
                    metrics.update(self.state.cost_metrics(adv.metrics["reward/mean"]))
                    timings = {"time/rollout_s": 0.0, "time/reward_s": 0.0}
                    hooks.after_step(self, metrics)  # 6. log / grid / eval
        self.state.rollouts += 1
        hooks.after_rollout(self)


def _minibatches(size: int, mini_batch_size: int) -> List[torch.Tensor]:
    return [torch.arange(s, min(s + mini_batch_size, size)) for s in range(0, size, mini_batch_size)]


class Hooks:
    """Phase 6 for every stage: metrics line, progress bar, sample grids, eval, checkpoints."""

    def __init__(self, cfg: JobConfig, run: RunDir, trainers: Dict[str, StageTrainer], evaluator, progress,
                 last_checkpoint: int):
        self.cfg, self.run, self.trainers, self.evaluator, self.progress = cfg, run, trainers, evaluator, progress
        self.last_checkpoint = last_checkpoint

    def after_step(self, trainer: StageTrainer, metrics: Dict) -> None:
        """One process scores and writes the run directory; a sharded (FSDP) policy's forward is collective, so
        then every process samples the eval images and the grid."""
        step, every, layout = trainer.state.step, self.cfg.logging, trainer.layout
        if not (layout.is_main or layout.sharded):
            return
        if self.evaluator is not None and every.eval_every and step % every.eval_every == 0:
            if layout.is_main:
                metrics.update(self.evaluator.evaluate(trainer.policy, step, metrics["reward/mean"]))
            else:
                self.evaluator.sample(trainer.policy)
        if layout.is_main:
            self.run.log_metrics(metrics)
            self.progress.update(1)
            self.progress.set_postfix(phase=trainer.stage, reward=f"{metrics['reward/mean']:.3f}",
                                      kl=f"{metrics['kl']:.2e}")
        if step == self.cfg.max_steps or (every.sample_every and step % every.sample_every == 0):
            grid = trainer.records[: min(len(trainer.records), 4)]
            prompts = [r.prompt for r in grid]
            images = trainer.policy.sample(prompts, [r.metadata for r in grid], seed=self.cfg.seed)
            if layout.is_main:
                self.run.save_grid(f"step_{step:06d}", images, prompts)
                self.run.plot_rewards()

    def after_rollout(self, trainer: StageTrainer) -> None:
        """Checkpoints are taken between rollouts (nothing half-trained is lost): every checkpoint_every steps
        and at the end. The main process writes; under FSDP every process takes part (the shards are gathered)."""
        step, every, layout = trainer.state.step, self.cfg.logging.checkpoint_every, trainer.layout
        due = every and step // every > self.last_checkpoint // every
        if (layout.is_main or layout.sharded) and (due or step >= self.cfg.max_steps):
            samplers = {s: t.sampler.state_dict() for s, t in self.trainers.items()}
            save_checkpoint(self.run.checkpoints, step, self.trainers, self.cfg,
                            {"run_state": trainer.state.to_dict(), "samplers": samplers}, write=layout.is_main)
            self.last_checkpoint = step


def _open_run(cfg: JobConfig, trainers: Dict[str, StageTrainer], state: RunState, run: RunDir) -> None:
    """Resume from ``cfg.resume`` or refuse to write over an existing run."""
    point = find_resume_point(cfg)
    if point is None:
        if cfg.resume is None and run.read_metrics():
            raise ConfigError(f"output_dir {run.path} already holds a run (metrics.jsonl); pass resume=auto to "
                              f"continue it, or choose another output_dir")
        return
    saved = read_state(point, cfg)
    restore(point, trainers, saved)
    state.load(saved["run_state"])
    for stage, t in trainers.items():
        t.sampler.load_state_dict(saved["samplers"][stage])
    if next(iter(trainers.values())).layout.is_main:
        run.truncate_metrics(state.step)  # steps logged after the checkpoint by a killed run are redone
    log.info("resumed from %s at step %d", point, state.step)


@contextlib.contextmanager
def _opened_run(cfg: JobConfig, trainers: Dict[str, StageTrainer], state: RunState, run: RunDir, evaluator):
    """Resume (or refuse to overwrite), write the run directory, and yield the phase-6 hooks; at the end close
    the progress bar, draw the reward curve and end the processes' group. Only the main process writes."""
    first = next(iter(trainers.values()))
    layout = first.layout
    _open_run(cfg, trainers, state, run)
    if layout.is_main:
        run.create(cfg)
    progress = _progress(cfg, state.step, layout)
    yield Hooks(cfg, run, trainers, evaluator, progress, last_checkpoint=state.step)
    progress.close()
    if layout.is_main:
        run.plot_rewards()
    finish(first.accelerator)


def _accelerator(cfg: JobConfig, policy):
    from accelerate import Accelerator

    # accelerate owns precision: rollout and training forwards run under the same autocast, so the first
    # on-policy ratio stays exactly 1 in bf16 too.
    return Accelerator(mixed_precision=cfg.optim.mixed_precision, cpu=policy.adapter.device.type == "cpu")


def _progress(cfg: JobConfig, initial: int, layout: Layout):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc="train", disable=not (cfg.logging.progress and layout.is_main),
                dynamic_ncols=True)


@contextlib.contextmanager
def _session(cfg: JobConfig):
    """Reward clients (training, and eval when configured) and the run directory, opened in that order."""
    from tandem.rewards.client import RewardClient

    with contextlib.ExitStack() as stack:
        rewards = stack.enter_context(RewardClient(cfg.rewards, cfg.reward_host))
        evaluator = None
        if cfg.logging.eval_every:
            from tandem.rl.periodic_eval import Evaluator

            eval_client = stack.enter_context(RewardClient(cfg.eval.rewards, cfg.reward_host)) if cfg.eval.rewards else rewards
            evaluator = Evaluator(cfg, eval_client)
        yield rewards, evaluator


def check_inputs(cfg: JobConfig, stage: str) -> None:
    """Unknown rewards, bad prompt files and bad buffers fail here, before any model is loaded."""
    from tandem.rewards.base import check_entries

    check_entries(cfg.rewards)
    check_entries(cfg.eval.rewards)
    training_records(cfg, "ar" if stage == "joint" else stage)


def train(cfg: JobConfig, stage: str) -> Path:
    """Run a GRPO job on ``stage`` ("ar" | "decoder"); returns the run directory."""
    check_inputs(cfg, stage)
    torch.manual_seed(cfg.seed)
    policy = build_policy(stage, cfg)
    run, state = RunDir(cfg.output_dir), RunState()
    with _session(cfg) as (rewards, evaluator):
        trainer = StageTrainer(stage, cfg, policy, rewards, run, _accelerator(cfg, policy), state)
        with _opened_run(cfg, {stage: trainer}, state, run, evaluator) as hooks:
            while state.step < cfg.max_steps:
                trainer.train_rollout(cfg.max_steps, hooks)
    return run.path


def train_joint(cfg: JobConfig) -> Path:
    """Alternate AR-GRPO and decoder flow-GRPO phases on one pipeline, one reward client and one run.

    Each AR phase's rollouts (prompts with their sampled full-grid tokens) are the conditions of the next
    decoder phase — the shared buffer in memory (and on disk with ``buffer.save``).
    """
    from tandem.policies.glm_image import load_pipeline

    check_inputs(cfg, "joint")
    torch.manual_seed(cfg.seed)
    m = cfg.model
    pipe = load_pipeline(m.path, m.dtype, m.device, m.create_tiny_if_missing)
    phases = {"ar": phase_config(cfg, "ar"), "decoder": phase_config(cfg, "decoder")}
    prompts = load_prompts(cfg.data.prompts, (cfg.data.height, cfg.data.width))
    run, state = RunDir(cfg.output_dir), RunState()
    with _session(cfg) as (rewards, evaluator):
        policies = {stage: build_policy(stage, phases[stage], pipe) for stage in ("ar", "decoder")}
        accelerator = _accelerator(cfg, policies["ar"])
        trainers = {stage: StageTrainer(stage, phases[stage], policies[stage], rewards, run, accelerator, state, prompts)
                    for stage in ("ar", "decoder")}
        j = cfg.joint
        cycle = [("ar", j.ar_steps_per_phase), ("decoder", j.decoder_steps_per_phase)]
        with _opened_run(cfg, trainers, state, run, evaluator) as hooks:
            while state.step < cfg.max_steps:
                for stage, steps in cycle:
                    trainer = trainers[stage]
                    if stage == "decoder" and trainers["ar"].latest_ar_records:
                        _condition_on(trainer, trainers["ar"].latest_ar_records, cfg.seed + state.rollouts)
                    stop = min(cfg.max_steps, state.step + steps)
                    while state.step < stop:
                        trainer.train_rollout(stop, hooks)
    return run.path


def _condition_on(trainer: StageTrainer, ar_records: List[PromptRecord], seed: int) -> None:
    """Point a joint job's decoder phase at the latest AR rollouts: their prompts and sampled token grids.

    Until the first AR phase has run (e.g. right after resuming inside a decoder phase) the decoder phase
    samples its conditions from the live frozen AR model instead.
    """
    trainer.records = ar_records
    trainer.sampler = PromptSampler(ar_records, seed, trainer.cfg.data.shuffle)
