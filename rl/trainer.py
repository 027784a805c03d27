"""The one GRPO loop, for every stage of every family (AR tokens, decoder denoising steps).

Each rollout batch goes through numbered phases (``StageTrainer.train_rollout``):

1. sample prompts — ``grpo.prompts_per_step`` prompts from the seeded prompt sampler;
2. rollout + score — the policy samples ``grpo.num_generations`` copies of each prompt (copies adjacent),
   in calls of whole groups and whole minibatches (``grpo.rollout_batch_size``, ``tandem.rl.rollout_batch``) —
   where the old log-probs are recomputed, after one ``Policy.prefetch`` of the whole batch (the AR policy draws
   every token sequence there, in one sampler call, and its calls only render) — and the objective ``prepare``s
   each call's sub-batch with the same weights (``tandem.rl.objectives``); each
   sub-batch's images go once into the Ray object store and are scored while the next sub-batch rolls out
   (``reward_host.async_scoring``). Every sub-batch is sampled by the current weights, so what is trained stays
   on-policy;
3. advantages — A = (R - mean_group) / (std + 1e-4) over the whole batch, NaN-safe, optionally clipped;
4. hand-off — what conditions the next stage (the AR stage's token grids) is kept, and saved as buffer shards
   when ``buffer.save``; then, with ``grpo.old_log_probs`` recompute, the old log-probs are recomputed by a
   no-grad forward of the training layout (the sampler's are kept as the behaviour policy);
5. update — ``grpo.num_iterations`` epochs over the minibatches (consecutive ``grpo.mini_batch_size`` samples of
   the rollout batch); one optimizer step per ``optim.gradient_accumulation_steps`` consecutive minibatches, then one step
   of the LR schedule; the chosen objective (``grpo.objective``) gives each of the policy's
   ``unit_chunks`` a loss, backpropagated one chunk at a time, weighted by its share of the units;
6. log / sample grid / eval / checkpoint — the run session's hooks (``tandem.rl.session``).

Each optimizer step logs the reward statistics of the rollout it trains on. ``time/rollout_s``,
``time/reward_s`` (the scoring time not hidden behind rollouts) and ``time/recompute_s`` (the old log-probs'
recompute, phase 4) are charged to the first optimizer step of their rollout (0 on the others), so they sum to
the run's totals. ``rollout/call_samples`` is the largest rollout call of the batch on this process
(``grpo.rollout_batch_size``; under auto the first batch measures with smaller calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from tandem.core.dtensor import full_tensor, shard_like
from tandem.core.errors import ConfigError
from tandem.core.seeds import derive_seed
from tandem.core.types import PromptRecord, Rollout
from tandem.rewards.client import RewardScores
from tandem.rewards.scoring import warn_unscored
from tandem.rl.advantages import AdvantageResult, compute_advantages
from tandem.rl.buffer import save_shard
from tandem.rl.config import JobConfig
from tandem.rl.data import PromptSampler
from tandem.rl.distributed import Layout, layout_of, shard
from tandem.rl.objectives import OBJECTIVES, merge_chunk_metrics
from tandem.rl.rollout_batch import RolloutBatching
from tandem.rl.run_state import RunState
from tandem.rl.stat_tracking import PerPromptStatTracker
from tandem.rl.weights import copy_into


def recomputes_old_log_probs(cfg: JobConfig, policy, rollout_layout_differs: bool = False) -> bool:
    """``grpo.old_log_probs``; "auto" recomputes where the rollout's numerics differ from the training forward's:
    where the policy says so (``Policy.rollout_matches_training``: its precision, its decode loop, a compiled
    forward) and where rollout forwards take another batch size than the minibatch (``rollout_layout_differs``,
    ``tandem.rl.rollout_batch``)."""
    mode = cfg.grpo.old_log_probs
    if mode != "auto":
        return mode == "recompute"
    return rollout_layout_differs or not policy.rollout_matches_training


def update_on_minibatch(policy, optimizer, batch: Union[Rollout, Sequence[Rollout]], cfg: JobConfig, accelerator,
                        layout: Layout = Layout(), scheduler=None,
                        before_step: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """One optimizer step on ``batch`` (this process's share of the minibatch), or on a list of minibatches whose
    gradients are accumulated (``optim.gradient_accumulation_steps``): chunked forward/backward, each minibatch's
    loss divided by their number — the gradient of the mean loss over the minibatches, which for equal
    minibatches is that of one minibatch of all their samples — then gradients averaged over processes (by
    FSDP's reduce-scatter when sharded), clip to the global norm, step, advance the LR schedule.
    ``before_step`` is called just before the weights start to change. Returns loss metrics (averaged over
    minibatches and processes), ``grad_norm`` and the ``lr`` of this step."""
    objective = OBJECTIVES.get(cfg.grpo.objective)()
    batches = [batch] if isinstance(batch, Rollout) else list(batch)
    optimizer.zero_grad(set_to_none=True)
    parts = []
    for mini in batches:
        num_units = mini.old_log_probs.shape[1]
        for chunk in policy.unit_chunks(mini):
            with accelerator.autocast():
                loss, metrics = objective.loss(policy, mini, chunk, cfg.grpo)
            share = (chunk.stop - chunk.start) / num_units / len(batches)
            accelerator.backward(loss * share)
            parts.append((share, metrics))
    layout.average_gradients(policy.trainable_parameters())
    # unscales fp16 gradients first (the optimizer is accelerate's, see build_optimizer); max_grad_norm 0 = no clip
    grad_norm = accelerator.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm or float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    before_step()
    optimizer.step()  # fp16: skipped when a gradient is inf/NaN, and the loss scale adapts
    merged = merge_chunk_metrics(parts)
    merged["grad_norm"] = float(grad_norm)
    scaler = getattr(accelerator, "scaler", None)  # accelerate's GradScaler under fp16
    if scaler is not None:
        merged["optim/loss_scale"] = float(scaler.get_scale())
        merged["optim/step_skipped"] = float(optimizer.step_was_skipped)
    if not getattr(optimizer, "step_was_skipped", False):
        if scheduler is not None:
            scheduler.step()
        policy.on_optimizer_step()
    return {**layout.mean(merged), "lr": lr}



def build_optimizer(policy, cfg: JobConfig, accelerator, num_steps: int):
    """AdamW over the trained parameters (``optim.*``: TRL/transformers names), wrapped by
    ``accelerator.prepare_optimizer``, and its LR schedule of ``num_steps`` optimizer steps with
    ``optim.warmup_steps`` of warm-up (``transformers.get_scheduler``). With ``optim.mixed_precision: fp16`` the
    wrapper owns accelerate's GradScaler, so ``accelerator.backward`` scales the loss, ``clip_grad_norm_``
    unscales the gradients before measuring them, and ``step`` skips a step whose gradients are inf/NaN (then
    lowers the scale; the schedule does not advance). Its ``.optimizer`` is the plain AdamW (checkpoints)."""
    from transformers import get_scheduler

    o = cfg.optim
    adamw = torch.optim.AdamW(policy.trainable_parameters(), lr=o.learning_rate, weight_decay=o.weight_decay,
                              betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon)
    scheduler = get_scheduler(o.lr_scheduler, adamw, num_warmup_steps=o.warmup_steps, num_training_steps=num_steps)
    return accelerator.prepare_optimizer(adamw, device_placement=False), scheduler


@dataclass
class ScoredRollout:
    """One rollout batch after phases 1-3.

    Attributes:
        subs: the sub-batches (whole groups each), this process's share, advantages filled in.
        advantages: the batch's advantage result (all processes' groups), with its reward metrics.
        scores: this process's per-reward scores, in the order of ``subs``.
        timings: ``time/rollout_s`` and ``time/reward_s`` of the batch.
    """

    subs: List[Rollout]
    advantages: AdvantageResult
    scores: RewardScores
    timings: Dict[str, float]


class StageTrainer:
    """GRPO on one stage: a policy, its optimizer and prompt stream; the rewards and run dir are shared."""

    def __init__(self, stage: str, cfg: JobConfig, policy, rewards, run, accelerator, state: RunState,
                 records: List[PromptRecord], num_steps: int):
        self.stage, self.cfg, self.policy, self.rewards, self.run = stage, cfg, policy, rewards, run
        self.accelerator, self.state, self.layout = accelerator, state, layout_of(accelerator, cfg)
        self.copies, self.mini_batch = self.layout.local_sizes(cfg)
        if self.layout.sharded:  # before the optimizer, which must hold the sharded parameters
            shard(policy, self.layout)
        self.optimizer, self.scheduler = build_optimizer(policy, cfg, accelerator, num_steps)
        g = cfg.grpo  # the same histories on every process (they see the same gathered rewards)
        self.stat_tracker = (PerPromptStatTracker(g.stat_tracking_buffer_size, g.stat_tracking_min_count)
                             if g.per_prompt_stat_tracking else None)
        self.use_records(records, cfg.seed)
        self.batching = RolloutBatching(cfg.grpo.rollout_batch_size // self.layout.world, self.copies,
                                        self.mini_batch, policy.device)
        policy.rollout_chunk_size = self.batching.forward_chunk
        self.recompute = (recomputes_old_log_probs(cfg, policy, not self.batching.forwards_minibatches)
                          and OBJECTIVES.get(cfg.grpo.objective).uses_old_log_probs)
        self.handoff: List[PromptRecord] = []  # the latest rollouts with their hand-off (joint schedule)
        # True from the start of an optimizer step's weight update until the step is counted: no checkpoint then.
        self.half_updated = False
        self.last_active = 0.0  # when train_rollout last started (which stage an exception came from)

    def use_records(self, records: List[PromptRecord], seed: int, position: Optional[Dict[str, int]] = None) -> None:
        """Train on ``records`` from now on (a joint job's decoder phase takes the latest AR rollouts), drawn from
        the start of a stream of ``seed``, or from ``position`` (a prompt sampler's ``state_dict``, seed included)."""
        self.records = records
        self.sampler = PromptSampler(records, seed, self.cfg.data.shuffle)
        if position is not None:
            self.sampler.load_state_dict(position)

    # -------------------------------------------------------------------------------- phases 1-3
    def rollout_and_score(self) -> ScoredRollout:
        g, cfg, layout = self.cfg.grpo, self.cfg, self.layout
        chosen = self.sampler.next_batch(g.prompts_per_step)  # 1. sample prompts (the same on every process)
        seed = derive_seed(cfg.seed, self.state.rollouts)  # the same on every process (tandem.core.seeds)
        objective = OBJECTIVES.get(g.objective)()
        self.policy.begin_rollout(*self.state.stage_counts(self.stage))  # what it schedules per rollout or step
        subs, futures, rollout_s, reward_s = [], [], 0.0, 0.0
        total, first_group = len(chosen) * self.copies, 0
        if self.recompute:  # the calls' log-probs are replaced: the policy may draw the whole batch at once
            t0 = time.perf_counter()
            with self.accelerator.autocast():
                self.policy.prefetch([r.prompt for r in chosen], [r.metadata for r in chosen], self.copies, seed=seed,
                                     first_copy=layout.rank * self.copies)
            rollout_s += time.perf_counter() - t0
        while first_group < len(chosen):  # 2. rollout + score, overlapped
            samples = self.batching.next_call(total - first_group * self.copies)
            part = chosen[first_group:first_group + samples // self.copies]
            t0 = time.perf_counter()
            with self.accelerator.autocast(), self.batching.measuring(samples, total):
                sub = self.policy.rollout([r.prompt for r in part], [r.metadata for r in part], self.copies, seed=seed,
                                          first_group=first_group, first_copy=layout.rank * self.copies)
                sub = objective.prepare(self.policy, sub, g)
            rollout_s += time.perf_counter() - t0
            sub.group_ids = sub.group_ids + first_group
            t1 = time.perf_counter()
            future = self.rewards.score(sub.images, sub.prompts, sub.metadata, sub.group_ids)
            if not cfg.reward_host.async_scoring:
                future.result()
            reward_s += time.perf_counter() - t1
            subs.append(sub)
            futures.append(future)
            first_group += len(part)
        t1 = time.perf_counter()
        parts = [f.result() for f in futures]
        reward_s += time.perf_counter() - t1
        local = RewardScores.concat(parts)
        whole, group_ids = layout.gather_rollout(local, np.concatenate([s.group_ids for s in subs]))
        self.rewards.check_failures(whole)  # reward_host.max_failed_*, over all processes
        scores = whole.scores
        if layout.is_main:
            warn_unscored(scores)
        adv = compute_advantages(scores, local.weights, group_ids,  # 3. advantages
                                 aggregation=g.multi_objective_aggregation, scale_rewards=g.scale_rewards,
                                 clip=g.adv_clip_max, stat_tracker=self.stat_tracker,
                                 prompts=[chosen[i].prompt for i in group_ids])
        mine = np.asarray(adv.advantages)[layout.local_slice(sum(len(s) for s in subs))]
        advantages = torch.as_tensor(mine, dtype=torch.float32, device=subs[0].old_log_probs.device)
        offset = 0
        for sub in subs:
            sub.advantages = advantages[offset:offset + len(sub)]
            offset += len(sub)
        return ScoredRollout(subs, adv, local, {"time/rollout_s": rollout_s, "time/reward_s": reward_s})

    # -------------------------------------------------------------------------------- phase 4
    def record_handoff(self, scored: ScoredRollout) -> None:
        """Keep the samples with what conditions the next stage (``Policy.handoff``); save them as a buffer
        shard when ``buffer.save``. A stage with nothing to hand off keeps nothing."""
        payloads = [self.policy.handoff(s) for s in scored.subs]
        if not payloads[0]:
            return
        payload = {k: torch.cat([p[k] for p in payloads]).detach().cpu() for k in payloads[0]}
        prompts = [p for s in scored.subs for p in s.prompts]
        metadata = [m for s in scored.subs for m in s.metadata]
        self.handoff = [PromptRecord(p, dict(m, **{k: v[i].numpy() for k, v in payload.items()}))
                        for i, (p, m) in enumerate(zip(prompts, metadata))]
        if self.cfg.buffer.save:  # each process writes its own samples
            mine = self.layout.local_slice(len(prompts))
            index = self.state.rollouts * self.layout.world + self.layout.rank
            save_shard(self.run.path / "buffer", index, images=np.concatenate([s.images for s in scored.subs]),
                       prompts=prompts, metadata=metadata, group_ids=np.concatenate([s.group_ids for s in scored.subs]),
                       payload=payload, scores=scored.scores, advantages=np.asarray(scored.advantages.advantages)[mine],
                       combined=np.asarray(scored.advantages.rewards)[mine], height=self.cfg.data.height,
                       width=self.cfg.data.width)

    @torch.no_grad()
    def recompute_old_log_probs(self, scored: ScoredRollout) -> Dict[str, float]:
        """Replace each sample's ``old_log_probs`` by the current weights' no-grad log-probs, minibatch by
        minibatch and chunk by chunk as the update will run them; keep the sampler's as ``behaviour_log_probs``.
        What else the same forward says about the old policy (``LogProbs.refresh``, e.g. the flow policy's step
        means) replaces the rollout's extras of that name. Returns the sampler-vs-trainer gap over active units:
        mean and max |Δ log-prob| and the mean k3 estimate of KL(sampler ‖ trainer) (``mismatch/*``)."""
        gaps = []
        for sub in scored.subs:
            fresh = torch.empty_like(sub.old_log_probs)
            for index in _minibatches(len(sub), self.mini_batch):
                batch = sub.select(index)
                parts = []
                with self.accelerator.autocast():
                    for chunk in self.policy.unit_chunks(batch):
                        out = self.policy.log_probs(batch, chunk, with_kl=False)
                        parts.append(out.log_probs.float())
                        for key, value in out.refresh.items():
                            old = sub.extras[key]
                            old[index.to(old.device), chunk] = value.to(old.device, old.dtype)
                fresh[index.to(fresh.device)] = torch.cat(parts, dim=1).to(fresh.device)
            sub.behaviour_log_probs, sub.old_log_probs = sub.old_log_probs, fresh
            delta = (fresh - sub.behaviour_log_probs)[sub.mask > 0]
            gaps.append(delta)
        delta = torch.cat(gaps)
        metrics = {"mismatch/abs/mean": delta.abs().mean().item(), "mismatch/abs/max": delta.abs().max().item(),
                   "mismatch/k3/mean": (torch.exp(delta) - delta - 1).mean().item()}
        return self.layout.mean(metrics)

    # -------------------------------------------------------------------------------- phases 5-6
    def train_rollout(self, stop_at: int, hooks) -> None:
        """One rollout batch and its updates; stops early at global step ``stop_at``."""
        self.last_active = time.monotonic()
        scored = self.rollout_and_score()
        self.record_handoff(scored)
        t0 = time.perf_counter()
        mismatch = self.recompute_old_log_probs(scored) if self.recompute else {}  # its .item() waits for the GPU
        timings = {**scored.timings, "time/recompute_s": time.perf_counter() - t0}
        call_samples = max(len(sub) for sub in scored.subs)
        accumulate = self.cfg.optim.gradient_accumulation_steps
        minibatches = [(sub, index) for sub in scored.subs for index in _minibatches(len(sub), self.mini_batch)]
        for epoch in range(self.cfg.grpo.num_iterations):  # 5. update
            self.policy.inner_epoch = epoch
            for start in range(0, len(minibatches), accumulate):
                if self.state.step >= stop_at:
                    break
                t0 = time.perf_counter()
                batches = [sub.select(index) for sub, index in minibatches[start:start + accumulate]]
                loss_metrics = update_on_minibatch(self.policy, self.optimizer, batches, self.cfg, self.accelerator,
                                                   self.layout, self.scheduler, before_step=self._updating)
                self.state.count_step(self.stage)
                self.half_updated = False
                reward_metrics = scored.advantages.metrics
                metrics = {"step": self.state.step, "phase": self.stage, "rollout": self.state.rollouts,
                           "rollout/call_samples": call_samples, **reward_metrics, **mismatch, **loss_metrics, **timings,
                           "time/train_s": time.perf_counter() - t0}
                metrics.update(self.state.cost_metrics(reward_metrics["reward/mean"]))
                timings = dict.fromkeys(timings, 0.0)
                hooks.after_step(self, metrics)  # 6. log / grid / eval
        self.state.count_rollout(self.stage)
        hooks.after_rollout(self)

    # -------------------------------------------------------------------------------- checkpoint contents
    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps of this stage (``tandem.rl.checkpoint`` writes it to files), whole tensors on the
        CPU; collective under FSDP (every process calls it, in the same order). Keys:

        * ``weights``: the trained parameters by name (LoRA), or the trained module's whole state dict;
        * ``optimizer``: the optimizer's full state dict, keyed by parameter name;
        * ``ema``: ``weights`` with the EMA of the trained ones in their place (None without EMA); ``ema_steps``;
        * ``extra_state``: ``policy.extra_state()`` (e.g. DiffusionNFT's old policy), {} for a policy without any;
        * ``handoff``: the latest rollouts' prompt records with what they hand to the next stage ([] for none);
        * ``scheduler``, ``sampler``, ``stat_tracker``: the state dicts of the LR schedule, the prompt stream and
          the per-prompt reward histories (None without ``grpo.per_prompt_stat_tracking``)."""
        policy = self.policy
        trained = {k: full_tensor(v).detach().cpu() for k, v in policy.trainable_state_dict().items()}
        weights = trained if self.cfg.optim.lora.enabled else {
            k: full_tensor(v).detach().cpu() for k, v in policy.trained_module.state_dict().items()}
        optimizer = get_optimizer_state_dict(policy.trained_module, _plain(self.optimizer),
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = getattr(policy, "ema", None)
        extra = getattr(policy, "extra_state", None)
        return {
            "weights": weights, "optimizer": optimizer,
            "ema": None if ema is None else {**weights, **{k: v.cpu() for k, v in ema.state_dict().items()}},
            "ema_steps": None if ema is None else ema.steps,
            "extra_state": {k: v.detach().cpu().contiguous() for k, v in extra().items()} if extra else {},
            "handoff": self.handoff, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
            "stat_tracker": None if self.stat_tracker is None else self.stat_tracker.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any], source: Path) -> None:
        """Restore what ``state_dict`` gave, as read back from the checkpoint ``source`` (named in errors). Every
        process loads whole tensors and keeps its own shards. ``ema``, ``extra_state``, ``handoff`` and
        ``stat_tracker`` may be absent or empty (a checkpoint of a stage that kept none): they are left as they are."""
        policy = self.policy
        names = [n for n, _ in policy.trainable_named_parameters()]
        copy_into(policy.trainable_named_parameters(), _trained(state["weights"], names, source), source, shard_like)
        set_optimizer_state_dict(policy.trained_module, _plain(self.optimizer), state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if state.get("extra_state") and hasattr(policy, "load_extra_state"):
            policy.load_extra_state(state["extra_state"])
        if state.get("handoff"):
            self.handoff = state["handoff"]
        if state.get("ema") is not None and getattr(policy, "ema", None) is not None:
            policy.ema.load_state_dict(_trained(state["ema"], names, source), steps=state.get("ema_steps") or 0)
        if state.get("stat_tracker") is not None and self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])

    def _updating(self) -> None:
        self.half_updated = True


def _minibatches(size: int, mini_batch_size: int) -> List[torch.Tensor]:
    return [torch.arange(s, min(s + mini_batch_size, size)) for s in range(0, size, mini_batch_size)]


def _plain(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _trained(weights: Dict[str, torch.Tensor], names, source: Path) -> Dict[str, torch.Tensor]:
    """The tensors of the trained parameters ``names`` among ``weights``; a missing one is an error."""
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"checkpoint {source}: {len(missing)} trained parameters missing, e.g. {missing[0]}")
    return {n: weights[n] for n in names}
