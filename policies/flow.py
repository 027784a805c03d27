"""The flow (decoder) policy: flow-GRPO over any flow-matching denoiser, through a family's ``FlowAdapter``.

Actions are denoising steps. A rollout integrates the release schedule from noise; steps inside the SDE window
are stochastic ``sde_step``s whose Gaussian log-probs are stored; the other steps are deterministic ODE steps
of the registered solver ``decoder.ode_solver`` (Euler, or DPM-Solver++(2M): ``policies.ode_solvers``); the
last step is never trained (Flow-GRPO, Liu et al. 2025; MixGRPO's ODE/SDE mixing, Li et al. 2025,
arXiv:2507.21802). The window is ``decoder.sde_window_size`` consecutive steps inside
``decoder.sde_window_range``: placed at random per rollout batch (``sde_window_schedule: random``), or sliding
with the decoder stage's rollout batches (``sliding``, MixGRPO's progressive schedule, ``sliding_window``) — or
the first ``timestep_fraction`` of the steps. The solver steps through the SDE window too, its sample replaced by
the SDE's, so a multistep solver's history (dpm2m: the previous step's data prediction x̂₀ = x − σv) runs through
the window, as MixGRPO-Flash keeps its ``DPMState``, and the first ODE step after the window is already second
order. Training replays each trained step from the stored latents — one step per forward pass (``unit_chunks``),
so memory does not grow with steps.

KL (``grpo.beta``) is the closed-form KL between the two step Gaussians, ||mu_theta - mu_ref||^2 / (2 std^2)
(``decoder.kl_form: exact``), or flow_grpo's ``kl_loss``, which is that times |dt| for Flow-SDE
(``decoder.kl_form: flow_grpo``; ``policies.sde.step_kl``), against the LoRA-disabled model or a frozen copy
when training all weights.

Seeds (``tandem.core.seeds``): the SDE window is drawn per rollout batch, the conditions per rollout call, the starting noise
per copy (per group with ``decoder.same_noise_in_group``) and the SDE noise per copy, all from the rollout seed
and the global group and copy indices — so the processes of a data-parallel job sample what one process would.

Objectives other than the clipped surrogate use the rest of a rollout's ``extras`` (``x0``: final clean latents,
``cond``: the conditions, ``old_means``: the step means the rollout sampled from, ``sample_seeds``: one seed per
copy for the objective's own draws) through ``velocity``, ``step_moments``, ``kl_to_reference`` and ``schedule``.

Old policy (``grpo.nft_old_decay_type`` > 0, DiffusionNFT's): the policy keeps a copy of the trained weights,
blended towards them before each rollout batch (``begin_rollout``: old ← d·old + (1 − d)·θ,
``policies.ema.old_policy_decay`` of the stage's optimizer steps), that samples the rollouts and gives v_old
(``old_weights``); it is checkpointed through ``extra_state``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import List, Sequence

import numpy as np
import torch

from tandem.policies.base import TrainedComponent
from tandem.policies.lora import MergedLoRA, apply_lora
from tandem.policies.ode_solvers import ODE_SOLVERS
from tandem.policies.render import ode_sample
from tandem.policies.settings import PolicySettings
from tandem.policies.sde import sde_step, step_kl
from tandem.core.dtensor import full_tensor, shard_like
from tandem.policies.ema import EMA, old_policy_decay
from tandem.core.seeds import CONDITIONS, NOISE, OBJECTIVE, SDE, WINDOW, RolloutSeeds
from tandem.core.types import LogProbs, Rollout, group_ids_for, repeat_for_groups


WINDOW_ENDS = ("roll_back", "shrink", "stay")


def sliding_window(lo: int, hi: int, size: int, stride: int, interval: int, rollout: int,
                   end: str = "roll_back") -> List[int]:
    """Step indices of MixGRPO's sliding SDE window for the stage's rollout batch ``rollout`` (0, 1, ...) (Li et al.
    2025, arXiv:2507.21802, §3.2, progressive strategy; Tencent-Hunyuan/MixGRPO ``GRPOTrainingStates`` with
    ``prog_overlap``). The window starts at ``lo`` and moves ``stride`` steps towards lower noise every
    ``interval`` rollout batches (MixGRPO's ``iters_per_group`` τ counts training iterations, one rollout each)::

        start(n) = lo + stride·j,   j = floor(n / interval),   window = [start, min(start + size, hi))

    ``end`` says what happens once the start has passed the last place below ``hi`` (P = ⌈(hi − lo)/stride⌉
    places):

    * ``roll_back`` — MixGRPO with ``--roll_back`` (both released scripts): j cycles, j mod P; near ``hi`` the
      window shrinks. MixGRPO also spends τ iterations on the empty window that starts at ``hi`` itself (nothing
      trained) when ``stride`` divides ``hi − lo``; here that place is skipped.
    * ``shrink`` — MixGRPO without it: the start stops at the last place, min(j, P − 1), with its shrunk window
      (MixGRPO's start moves on to ``hi``, an empty window, and trains nothing from then on).
    * ``stay`` — the window keeps its size and stops at ``hi − size``.

    A function of the rollout count only, so a resumed run continues the same schedule."""
    move = rollout // interval
    if end == "stay":
        start = min(lo + stride * move, hi - size)
        return list(range(start, start + size))
    if end not in WINDOW_ENDS:
        raise ValueError(f"sliding_window: end must be one of {', '.join(WINDOW_ENDS)}, got {end!r}")
    places = -(-(hi - lo) // stride)
    start = lo + stride * (move % places if end == "roll_back" else min(move, places - 1))
    return list(range(start, min(start + size, hi)))


def trained_step_indices(cfg, num_steps: int, rng: np.random.Generator, rollout: int = 0) -> List[int]:
    """Indices of the SDE (trained) steps of one rollout call in the stage's rollout batch ``rollout``; never the
    last step."""
    if cfg.sde_window_size > 0:
        lo, hi = cfg.sde_window_range
        if cfg.sde_window_schedule == "sliding":
            return sliding_window(lo, hi, cfg.sde_window_size, cfg.sde_window_stride, cfg.sde_window_shift_interval,
                                  rollout, cfg.sde_window_end)
        start = int(rng.integers(lo, hi - cfg.sde_window_size + 1))
        return list(range(start, start + cfg.sde_window_size))
    count = max(1, int(round(cfg.timestep_fraction * (num_steps - 1))))
    return list(range(count))


class FlowPolicy(TrainedComponent):
    """Flow-GRPO over ``adapter.denoiser``; ``settings`` is the decoder stage's ``PolicySettings``
    (``policies.settings``; ``section`` is the ``decoder`` config)."""

    stage = "decoder"

    def __init__(self, adapter, settings: PolicySettings):
        self.adapter, self.settings, self.d = adapter, settings, settings.section
        base = self.trained_module = adapter.denoiser
        if settings.gradient_checkpointing:
            base.enable_gradient_checkpointing()
        if settings.lora.enabled:
            self.model = apply_lora(base, settings.lora)
            self.reference = None  # the adapter-disabled model
        else:
            self.model = base.requires_grad_(True)
            self.reference = copy.deepcopy(base).requires_grad_(False).eval() if settings.keeps_reference else None
        if self.d.compile:  # after LoRA injection, so the compiled blocks include the adapters
            base.compile_repeated_blocks()  # the dynamo/inductor settings it needs are made at CLI start-up
        self.model.eval()  # no dropout: the training forward must reproduce the rollout forward
        self.ema = (EMA(self.trainable_named_parameters(), self.d.ema_decay, self.d.ema_warmup,
                        self.d.ema_update_interval) if self.d.ema_decay > 0 else None)
        # Where rollout and training forwards already round apart (``decoder.compile``: the old log-probs are
        # recomputed), a LoRA rollout runs with its adapters merged into the weights: fewer matmuls per block.
        self.merged_rollout = MergedLoRA(enabled=settings.lora.enabled and not self.rollout_matches_training)
        self.old_decay_type = settings.old_decay_type
        self.old = None  # the old policy's weights (module docstring), made at the first rollout or restore

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def rollout_matches_training(self) -> bool:
        """Whether the rollout's stored log-probs are the training forward's: the same denoiser call on the same
        inputs, unless ``decoder.compile`` compiles rollout (no-grad) and training forwards apart."""
        return not self.d.compile

    def handoff(self, batch: Rollout) -> dict:
        return {}

    # ------------------------------------------------------------------ old policy
    def begin_rollout(self, rollouts: int, steps: int) -> None:
        """The stage's counts (``TrainedComponent``); with an old policy, old ← d·old + (1 − d)·θ first, d =
        ``old_policy_decay(steps, grpo.nft_old_decay_type)`` (DiffusionNFT blends after each rollout's updates,
        i.e. before the next rollout; d = 0 at the first, so old starts as θ)."""
        super().begin_rollout(rollouts, steps)
        if self.old_decay_type:
            self._old().blend(self.trainable_parameters(), old_policy_decay(steps, self.old_decay_type))

    def _old(self) -> EMA:
        if self.old is None:  # made after sharding (the trainer shards before any rollout), so laid out alike
            self.old = EMA(self.trainable_named_parameters(), decay=0.0)
        return self.old

    def old_weights(self):
        """Context in which ``self.model`` carries the old policy's weights (the current ones without an old
        policy): what samples the rollouts and gives DiffusionNFT's v_old."""
        if self.old is None:
            return contextlib.nullcontext()
        return self.old.swapped(self.trainable_parameters())

    def extra_state(self) -> dict:
        """Tensors to checkpoint besides the weights, by name: the old policy's weights (``old/<parameter>``),
        whole (collective under FSDP); empty without one."""
        if self.old is None:
            return {}
        return {f"old/{name}": full_tensor(t) for name, t in zip(self.old.names, self.old.shadow)}

    def load_extra_state(self, state: dict) -> None:
        """Restore ``extra_state`` (this process keeps its shards)."""
        old = {k[len("old/"):]: v for k, v in state.items() if k.startswith("old/")}
        if old and self.old_decay_type:
            target = self._old()
            target.shadow = [shard_like(old[n].to(p.device, p.dtype), p.detach())
                             for n, p in zip(target.names, self.trainable_parameters())]

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                first_group: int = 0, first_copy: int = 0) -> Rollout:
        """Sample ``group_size`` images per prompt (copies adjacent). ``extras`` (batch first): latents,
        next_latents, old_means (B, K, C, h, w) before/after each trained step and the mean it was sampled from;
        timesteps, sigmas, next_sigmas (B, K); x0 (B, C, h, w) the final latents; noise_seeds (B,) the
        starting-noise seeds; sample_seeds (B,) per-copy seeds for the objective; cond, the adapter's condition
        tensors. No grad.

        ``seed`` is the rollout batch's seed, ``first_group`` the global index of the first prompt's group and
        ``first_copy`` the index of this call's first copy within each group (``tandem.core.seeds``). Sampled by
        the old policy's weights where one is kept (``old_weights``), with LoRA adapters merged where
        ``merged_rollout`` is enabled (``policies.lora.MergedLoRA``)."""
        with self.old_weights(), self.merged_rollout(self.model):
            return self._sample(prompts, metadata, group_size, seed, first_group, first_copy)

    def _sample(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int, first_group: int,
                first_copy: int) -> Rollout:
        seeds = RolloutSeeds(seed, first_group, first_copy)
        rng = np.random.default_rng(seeds.batch(WINDOW))
        group_ids = group_ids_for(len(prompts), group_size)
        copies = [i % group_size for i in range(len(group_ids))]
        cond = {k: v.repeat_interleave(group_size, dim=0)
                for k, v in self.adapter.conditions(prompts, metadata, seeds.call(CONDITIONS)).items()}
        noise_seeds = [seeds.group(NOISE, g) if self.d.same_noise_in_group else seeds.copy(NOISE, g, c)
                       for g, c in zip(group_ids, copies)]
        x = self.adapter.initial_noise(noise_seeds)
        timesteps, sigmas = self.adapter.schedule(self.d.num_steps)
        train_steps = trained_step_indices(self.d, self.d.num_steps, rng, self.rollout_index)
        gen = [torch.Generator(device="cpu").manual_seed(seeds.copy(SDE, g, c)) for g, c in zip(group_ids, copies)]

        chunks = self._rollout_chunks(len(group_ids))
        before, after, means, logps = [], [], [], []
        solver, state = ODE_SOLVERS.get(self.d.ode_solver, "decoder.ode_solver")(), None
        for i, t in enumerate(timesteps):
            v = torch.cat([self.adapter.velocity(self.model, x[c], t, _rows(cond, c), self.d.guidance_scale)
                           for c in chunks])
            x_next, state = solver.step(v, x, sigmas[i], sigmas[i + 1], state)  # state runs through the window
            if i in train_steps:
                x_next, logp, mean, _ = sde_step(v, x, sigmas[i], sigmas[i + 1], self.d.noise_level, generator=gen,
                                                 kind=self.d.sde_type, cps_log_prob=self.d.cps_log_prob)
                before.append(x)
                after.append(x_next)
                means.append(mean)
                logps.append(logp)
            x = x_next
        b, k = len(group_ids), len(train_steps)
        idx = torch.tensor(train_steps)
        return Rollout(
            images=self.adapter.decode(x), prompts=repeat_for_groups(prompts, group_size),
            metadata=repeat_for_groups(metadata, group_size), group_ids=group_ids,
            old_log_probs=torch.stack(logps, dim=1), mask=torch.ones(b, k, device=x.device),
            extras=dict(latents=torch.stack(before, dim=1), next_latents=torch.stack(after, dim=1),
                        old_means=torch.stack(means, dim=1), x0=x, cond=cond,
                        timesteps=timesteps[idx].expand(b, k), sigmas=sigmas[idx].expand(b, k),
                        next_sigmas=sigmas[idx + 1].expand(b, k),
                        noise_seeds=torch.tensor(noise_seeds, dtype=torch.int64),
                        sample_seeds=torch.tensor([seeds.copy(OBJECTIVE, g, c) for g, c in zip(group_ids, copies)],
                                                  dtype=torch.int64)),
        )

    def _rollout_chunks(self, batch: int) -> List[slice]:
        """The rollout's forward batches: ``rollout_chunk_size`` samples (set by the trainer: the minibatch under CPU
        auto, i.e. the training layout; else the whole call, ``tandem.rl.rollout_batch``)."""
        size = self.rollout_chunk_size or batch
        return [slice(s, min(s + size, batch)) for s in range(0, batch, size)]

    # ------------------------------------------------------------------ learning
    def unit_chunks(self, batch: Rollout) -> List[slice]:
        return [slice(k, k + 1) for k in range(batch.old_log_probs.shape[1])]

    def _step_mean(self, model, batch: Rollout, k: int):
        e = batch.extras
        v = self.adapter.velocity(model, e["latents"][:, k], e["timesteps"][:, k], e["cond"], self.d.guidance_scale)
        return sde_step(v, e["latents"][:, k], e["sigmas"][:, k], e["next_sigmas"][:, k], self.d.noise_level,
                        prev_sample=e["next_latents"][:, k], kind=self.d.sde_type, cps_log_prob=self.d.cps_log_prob)

    def step_moments(self, batch: Rollout, k: int):
        """Trained step ``k`` under the current weights (with grad): log_prob (B,), mean (B, C, h, w), std
        (B, 1, 1, 1) of the step Gaussian that the stored ``next_latents`` are scored under."""
        _, logp, mean, std = self._step_mean(self.model, batch, k)
        return logp, mean, std

    def kl_to_reference(self, batch: Rollout, k: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """(B, 1) KL term of step ``k``'s Gaussian (``mean``, ``std``) against the reference model's
        (``decoder.kl_form``, ``policies.sde.step_kl``)."""
        with torch.no_grad(), self._reference() as ref:
            _, _, ref_mean, _ = self._step_mean(ref, batch, k)
        e = batch.extras
        return step_kl(mean, ref_mean, std, e["sigmas"][:, k], e["next_sigmas"][:, k], self.d.sde_type,
                       self.d.kl_form)[:, None]

    def log_probs(self, batch: Rollout, chunk: slice, with_kl: bool) -> LogProbs:
        """Log-prob (B, 1) of trained step ``chunk.start``, its KL term, and its step mean as ``old_means``
        (``LogProbs.refresh``: a recompute of the old log-probs recomputes the old means with them)."""
        k = chunk.start
        logp, mean, std = self.step_moments(batch, k)
        return LogProbs(logp[:, None], self.kl_to_reference(batch, k, mean, std) if with_kl else None,
                        refresh={"old_means": mean[:, None]})

    def velocity(self, batch: Rollout, latents: torch.Tensor, t: torch.Tensor, grad: bool,
                 reference: bool = False) -> torch.Tensor:
        """(B, C, h, w) float32 velocity at (``latents``, ``t`` (B,)) under ``batch``'s conditions, without CFG
        (guidance 1), of the current weights (with grad when ``grad``; the old policy's inside ``old_weights``) or
        of the reference model (no grad)."""
        if reference:
            with torch.no_grad(), self._reference() as ref:
                return self.adapter.velocity(ref, latents, t, batch.extras["cond"], 1.0)
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self.adapter.velocity(self.model, latents, t, batch.extras["cond"], 1.0)

    def schedule(self):
        """Timesteps (S,) and sigmas (S+1,) of the training rollouts (``decoder.num_steps``)."""
        return self.adapter.schedule(self.d.num_steps)

    @contextlib.contextmanager
    def _reference(self):
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    def on_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.trainable_parameters())

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> np.ndarray:
        """Eval images: ODE with ``decoder.eval_num_steps`` steps, EMA weights when kept."""
        cond = self.adapter.conditions(prompts, metadata, seed)
        with (self.ema.swapped(self.trainable_parameters()) if self.ema else contextlib.nullcontext()):
            return ode_sample(self.adapter, self.model, cond, [seed + i for i in range(len(prompts))],
                              self.d.eval_num_steps, self.d.guidance_scale)


def _rows(cond: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in cond.items()}
