"""Training objectives: the extension point for what the update step minimises (``grpo.objective``).

An objective turns one chunk of a minibatch into a scalar loss and its metrics; the update step
(``tandem.rl.trainer.update_on_minibatch``) backpropagates each chunk's loss weighted by its share of the
units, so an objective never sees the optimizer, the accelerator or the processes. Before that, right after
each rollout and with the weights that sampled it, ``prepare(policy, batch, grpo)`` may add what the objective
needs to the batch (no grad). Register a new one with ``@OBJECTIVES.register("name")`` on a class with
``stages``, ``uses_old_log_probs``, ``prepare`` and ``loss(policy, batch, chunk, grpo)`` (made anew for each
use), and optionally a static ``validate(job, stage)`` that checks its own keys (a ``ConfigError``, one line);
config validation reads the registry, so its name is at once a valid ``grpo.objective``.

Registered: ``clipped_surrogate`` (GRPO / Flow-GRPO, both stages; GSPO with ``grpo.importance_sampling_level:
sequence``), ``grpo_guard`` (Flow-GRPO with GRPO-Guard's ratio normalisation and step reweighting, decoder) and
``diffusion_nft`` (DiffusionNFT on the forward process, decoder).

Metrics named ``*/min`` and ``*/max`` are merged over chunks by min and max, all others by the chunks' share.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Protocol, Tuple

import torch

from tandem.core.errors import require as _rule
from tandem.core.registry import Registry
from tandem.core.types import Rollout
from tandem.rl.losses import get_loss_type, guard_step_weights, policy_loss, ratio_norm_log_ratio
from tandem.policies.ema import OLD_DECAYS
from tandem.rl.nft import nft_loss, optimality_probability


class Objective(Protocol):
    stages: Tuple[str, ...]  # the policy stages it can train
    uses_old_log_probs: bool  # whether its loss reads Rollout.old_log_probs (then grpo.old_log_probs applies)

    def prepare(self, policy, batch: Rollout, grpo) -> Rollout:
        """``batch`` with what ``loss`` needs added, computed right after the rollout (no grad)."""

    def loss(self, policy, batch: Rollout, chunk: slice, grpo) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Scalar loss of ``batch``'s units in ``chunk`` (with grad) and float metrics; ``grpo`` is the config section."""


OBJECTIVES: Registry[Objective] = Registry("objective")


@OBJECTIVES.register("clipped_surrogate")
class ClippedSurrogate:
    """GRPO's clipped surrogate with an optional KL penalty (``tandem.rl.losses.policy_loss``), for both stages:
    AR tokens (TRL ``GRPOTrainer``) and decoder SDE steps (Flow-GRPO, Liu et al. 2025)."""

    stages = ("ar", "decoder")

    uses_old_log_probs = True

    def prepare(self, policy, batch: Rollout, grpo) -> Rollout:
        return batch

    def loss(self, policy, batch: Rollout, chunk: slice, grpo) -> Tuple[torch.Tensor, Dict[str, float]]:
        out = policy.log_probs(batch, chunk, with_kl=grpo.beta > 0)
        return policy_loss(out.log_probs, batch.old_log_probs[:, chunk], batch.advantages, batch.mask[:, chunk],
                           epsilon_low=grpo.epsilon, epsilon_high=grpo.epsilon_high, loss_type=grpo.loss_type,
                           kl=out.kl, beta=grpo.beta, is_weights=rollout_is_weights(batch, chunk, grpo),
                           importance_sampling_level=grpo.importance_sampling_level)


def rollout_is_weights(batch: Rollout, chunk: slice, grpo):
    """(B, u) truncated IS weights min(π_old / π_sampler, ``grpo.rollout_is_cap``) of the units in ``chunk`` when
    the old log-probs were recomputed (``grpo.old_log_probs``), else None."""
    if grpo.rollout_is_cap is None or batch.behaviour_log_probs is None:
        return None
    old = batch.old_log_probs[:, chunk]
    return torch.exp(old - batch.behaviour_log_probs[:, chunk].to(old.device)).clamp(max=grpo.rollout_is_cap)


@OBJECTIVES.register("grpo_guard")
class GrpoGuard:
    """Flow-GRPO's clipped surrogate on GRPO-Guard's normalised ratio r̃ = exp((logp − old_logp + b)·std), each
    step's loss weighted by w_k = Δ̄/|dt_k| with Δ̄ the mean step of the rollout's schedule
    (``tandem.rl.losses.ratio_norm_log_ratio``, ``guard_step_weights``; Wang et al. 2025, arXiv:2510.22319).
    The decoder's unit chunks are single steps, so the chunk's loss is scaled by its step's weight (the same for
    every sample: the window is shared by the rollout batch). b compares the current step mean with
    ``extras["old_means"]``, the mean that ``old_log_probs`` were scored under: the rollout's, or the recomputed
    one where ``grpo.old_log_probs`` recomputes (the flow policy's ``LogProbs.refresh``)."""

    stages = ("decoder",)
    uses_old_log_probs = True

    def prepare(self, policy, batch: Rollout, grpo) -> Rollout:
        return batch

    def loss(self, policy, batch: Rollout, chunk: slice, grpo) -> Tuple[torch.Tensor, Dict[str, float]]:
        k, e = chunk.start, batch.extras
        logp, mean, std = policy.step_moments(batch, k)
        old = batch.old_log_probs[:, chunk]
        log_ratio = ratio_norm_log_ratio(logp[:, None], old, mean, e["old_means"][:, k], std)
        kl = policy.kl_to_reference(batch, k, mean, std) if grpo.beta > 0 else None
        loss, metrics = policy_loss(old.float() + log_ratio, old, batch.advantages, batch.mask[:, chunk],
                                    epsilon_low=grpo.epsilon, epsilon_high=grpo.epsilon_high,
                                    loss_type=grpo.loss_type, kl=kl, beta=grpo.beta,
                                    is_weights=rollout_is_weights(batch, chunk, grpo))
        _, schedule = policy.schedule()
        weight = guard_step_weights(e["sigmas"], e["next_sigmas"], schedule)[:, k].mean()
        metrics["guard/step_weight"] = float(weight)
        return loss * weight, metrics


@OBJECTIVES.register("diffusion_nft")
class DiffusionNFT:
    """DiffusionNFT (``tandem.rl.nft``): flow matching on the forward process of the rollout's clean samples,
    steered by the implicit positive/negative policies. Units are ``grpo.nft_num_timesteps`` forward-process
    timesteps per sample (one per pass); no log-probs, any rollout solver, no CFG (``validate`` refuses a
    ``decoder.guidance_scale`` other than 1: v_old, v_θ and v_ref are unguided, so the rollouts must be too).

    ``prepare`` draws each sample's timesteps (from the rollout schedule, without repeats) and noise from its
    ``sample_seeds`` entry (``tandem.core.seeds``: the same draws however the job is split over processes) — one
    set, or one per update epoch with ``grpo.nft_fresh_noise`` — and stores x_σ, σ's timestep, σ, the target
    ε − x₀ and the old velocity v_old, computed there by the old policy (the weights that sampled the rollout:
    the current ones, or the flow policy's ``old_weights`` with ``grpo.nft_old_decay_type``). The loss of the
    update epoch ``policy.inner_epoch`` reads its set. ``grpo.nft_adaptive_weight`` weighs it in x₀ space as the
    reference does, ``grpo.nft_scale_policy_loss`` multiplies it by Z = ``grpo.adv_clip_max``, and ``grpo.beta`` > 0
    adds β·mean((v_θ − v_ref)²) per unit (the reference implementation's KL term)."""

    stages = ("decoder",)
    uses_old_log_probs = False

    @staticmethod
    def validate(job, stage: str) -> None:
        """Its keys' rules (ConfigError, one line)."""
        g, d = job.grpo, job.decoder
        _rule(1 <= g.nft_num_timesteps <= d.num_steps, "grpo.nft_num_timesteps",
              f"must be in [1, decoder.num_steps={d.num_steps}], got {g.nft_num_timesteps}")
        _rule(g.nft_beta > 0, "grpo.nft_beta", f"must be > 0, got {g.nft_beta}")
        _rule(g.adv_clip_max is not None and g.adv_clip_max > 0, "grpo.adv_clip_max",
              "diffusion_nft maps advantages to r = 1/2 + clip(A / adv_clip_max, -1, 1) / 2: set it > 0 (e.g. 5)")
        _rule(d.guidance_scale == 1.0, "decoder.guidance_scale",
              f"is {d.guidance_scale}, but diffusion_nft computes v_old, v_theta and v_ref without CFG, so its "
              f"rollouts must be sampled without it too: set decoder.guidance_scale=1")
        _rule(g.nft_old_decay_type in OLD_DECAYS, "grpo.nft_old_decay_type",
              f"is {g.nft_old_decay_type}; allowed: {', '.join(map(str, OLD_DECAYS))}")

    @torch.no_grad()
    def prepare(self, policy, batch: Rollout, grpo) -> Rollout:
        x0 = batch.extras["x0"].float()
        b, k = x0.shape[0], grpo.nft_num_timesteps
        epochs = grpo.num_iterations if grpo.nft_fresh_noise else 1
        timesteps, sigmas = policy.schedule()
        gens = [torch.Generator().manual_seed(int(seed)) for seed in batch.extras["sample_seeds"]]
        draws = [_forward_draws(g, len(timesteps), k, x0.shape[1:], epochs) for g in gens]
        idx = torch.stack([i for i, _ in draws]).to(sigmas.device)  # (B, E·K): epoch e's units at e·K ... e·K + K − 1
        noise = torch.stack([n for _, n in draws]).to(x0.device)
        sigma = sigmas[idx]
        s = sigma.view(b, epochs * k, *[1] * (x0.ndim - 1)).to(x0.device)
        xt = (1 - s) * x0[:, None] + s * noise
        t = timesteps[idx]
        with policy.old_weights():
            v_old = torch.stack([policy.velocity(batch, xt[:, j], t[:, j], grad=False) for j in range(epochs * k)],
                                dim=1)
        extras = dict(batch.extras, nft_xt=xt, nft_t=t, nft_sigma=sigma, nft_target=noise - x0[:, None],
                      nft_v_old=v_old)
        ones = torch.ones(b, k, device=batch.mask.device)
        return replace(batch, old_log_probs=torch.zeros_like(ones), mask=ones, extras=extras)

    def loss(self, policy, batch: Rollout, chunk: slice, grpo) -> Tuple[torch.Tensor, Dict[str, float]]:
        e, k = batch.extras, batch.mask.shape[1]
        j = (policy.inner_epoch % (e["nft_t"].shape[1] // k)) * k + chunk.start  # this epoch's draw of the unit
        v = policy.velocity(batch, e["nft_xt"][:, j], e["nft_t"][:, j], grad=True)
        r = optimality_probability(batch.advantages, grpo.adv_clip_max)
        sigma = e["nft_sigma"][:, j] if grpo.nft_adaptive_weight else None
        per_unit = nft_loss(v, e["nft_v_old"][:, j], e["nft_target"][:, j], r, grpo.nft_beta, sigma)[:, None]
        if grpo.nft_scale_policy_loss:
            per_unit = per_unit * grpo.adv_clip_max
        kl = torch.zeros_like(per_unit)
        if grpo.beta > 0:
            v_ref = policy.velocity(batch, e["nft_xt"][:, j], e["nft_t"][:, j], grad=False, reference=True)
            kl = (v.float() - v_ref.float()).pow(2).mean(dim=tuple(range(1, v.ndim)))[:, None]
        mask = batch.mask[:, chunk].float()
        loss = get_loss_type(grpo.loss_type)(per_unit + grpo.beta * kl, mask, per_unit.shape[1])
        with torch.no_grad():
            deviation = (v.float() - e["nft_v_old"][:, j].float()).pow(2).mean()
        return loss, {"loss": loss.item(), "kl": kl.mean().item(), "nft/r_mean": r.mean().item(),
                      "nft/old_deviation": deviation.item()}


def _forward_draws(gen: torch.Generator, num_timesteps: int, k: int, shape, epochs: int):
    """One sample's forward-process draws from its generator, epoch by epoch: k timestep indices without repeats
    (a random permutation's first k, as the reference takes the first of its per-epoch permutation), then k noise
    tensors. Returns indices (E·K,) and noise (E·K, *shape)."""
    idx, noise = [], []
    for _ in range(epochs):
        idx.append(torch.randperm(num_timesteps, generator=gen)[:k])
        noise.append(torch.randn((k, *shape), generator=gen))
    return torch.cat(idx), torch.cat(noise)


def merge_chunk_metrics(parts) -> Dict[str, float]:
    """Metrics of one minibatch from (share, metrics) per chunk (module docstring: how they merge)."""
    merged = {}
    for key in parts[0][1]:
        values = [m[key] for _, m in parts]
        if key.endswith("/min"):
            merged[key] = min(values)
        elif key.endswith("/max"):
            merged[key] = max(values)
        else:
            merged[key] = float(sum(w * m[key] for w, m in parts))
    return merged
