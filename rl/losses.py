"""The clipped-surrogate GRPO loss shared by both stages, its ``loss_type`` reductions, and the k3 KL term.

One action unit is a token (AR stage) or a trained denoising step (flow stage); every tensor below is laid out
(B, U) = (sequences, units). With ratio ``r = exp(logp − old_logp)`` and the sequence advantage ``A``, the
per-unit loss is PPO's clipped surrogate plus an optional KL penalty (TRL ``GRPOTrainer.compute_loss``)::

    ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) + β·kl

``ε_high ≠ ε_low`` is DAPO's clip-higher. With ``importance_sampling_level="sequence"`` (GSPO, Zheng et al. 2025,
"Group Sequence Policy Optimization", arXiv:2507.18071, eq. 7; TRL ``importance_sampling_level``) every unit of a
sequence takes the sequence's ratio ``s = exp(Σ_u m·(logp − old_logp) / Σ_u m)``, and the clip acts on ``s``.
``kl`` is supplied by the policy: ``tandem.policies.kl.k3_kl`` for the AR stage,
``policies.sde.step_kl`` per trained step for the flow stage (``decoder.kl_form``).

How the (B, U) losses become one scalar is the ``loss_type``, a registry of reductions (add one with
``@register_loss_type("name")``). ``mask`` holds float weights ≥ 0 (0 = padding / untrained unit), so per-segment
loss weights are folded into it. With m = mask, Σ over units (u) and sequences (b):

    grpo     mean_b( Σ_u m·ℓ / Σ_u m )           per-sequence weighted mean, then mean over sequences
    bnpo     Σ m·ℓ / Σ m                          weighted mean over all units of the batch
    dr_grpo  Σ m·ℓ / (B · max_units)             Dr. GRPO's constant normaliser (max_units defaults to U)
    dapo     Σ m·ℓ / Σ m                          DAPO token-level mean. TRL divides by the active-unit count
                                                  of the whole generation batch (all processes and
                                                  accumulation windows); on this one (B, U) batch that count
                                                  is Σ m, so here ``dapo`` equals ``bnpo``.

Weights therefore act relatively within a sequence for ``grpo``, within the batch for ``bnpo``/``dapo``, and
absolutely for ``dr_grpo``. A sequence whose mask is all zero contributes 0 (and still counts in the ``grpo``
mean over sequences, as in TRL).
"""

from __future__ import annotations

from typing import Callable

import torch

from tandem.core.registry import Registry

Reduction = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(per_unit_loss (B, U), mask (B, U), max_units) -> scalar loss."""

LOSS_TYPES: Registry[Reduction] = Registry("loss type")
register_loss_type = LOSS_TYPES.register
"""Decorator that registers a reduction under a name; a name can be registered once."""


def get_loss_type(name: str) -> Reduction:
    """The reduction registered as ``name``; a ConfigError listing the valid names otherwise."""
    return LOSS_TYPES.get(name)


def _weighted_mean(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den is 0 (then num is 0 too: every term was masked out)."""
    return num / den.clamp(min=torch.finfo(den.dtype).tiny)


@register_loss_type("grpo")
def _grpo(per_unit: torch.Tensor, mask: torch.Tensor, max_units: int) -> torch.Tensor:
    return _weighted_mean((per_unit * mask).sum(-1), mask.sum(-1)).mean()


@register_loss_type("bnpo")
@register_loss_type("dapo")
def _token_mean(per_unit: torch.Tensor, mask: torch.Tensor, max_units: int) -> torch.Tensor:
    return _weighted_mean((per_unit * mask).sum(), mask.sum())


@register_loss_type("dr_grpo")
def _dr_grpo(per_unit: torch.Tensor, mask: torch.Tensor, max_units: int) -> torch.Tensor:
    return (per_unit * mask).sum() / (per_unit.shape[0] * max_units)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    max_units: int | None = None,
    is_weights: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss (formula and reductions in the module docstring).

    Args:
        logp: (B, U) log-probs of the taken actions under the current policy, with grad.
        old_logp: (B, U) log-probs stored at rollout (detached here).
        advantages: (B,) one advantage per sequence (detached here).
        mask: (B, U) float weights ≥ 0; 0 excludes a unit.
        epsilon_low, epsilon_high: clip range [1 − ε_low, 1 + ε_high].
        loss_type: a registered reduction: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``.
        kl: (B, U) per-unit KL term (``k3_kl`` or per-step ``step_kl``), with grad; required when beta ≠ 0.
        beta: KL coefficient β.
        max_units: ``dr_grpo`` normaliser (TRL's ``max_completion_length``); defaults to U.
        is_weights: (B, U) truncated importance weights of the rollout/training mismatch,
            w = min(π_old / π_sampler, cap) (verl's rollout correction); they scale each unit's surrogate term
            (not the KL), detached. None = 1.
        importance_sampling_level: "token" (one ratio per unit) or "sequence" (GSPO: the mask-weighted mean
            log-ratio of each sequence, for all its units).

    Returns:
        loss: scalar tensor, differentiable w.r.t. ``logp`` (and ``kl``).
        metrics: floats over active units (mask > 0), unweighted: ``ratio/mean``, ``ratio/min``, ``ratio/max``;
            ``clipfrac`` = share where the clip is active, (r < 1 − ε_low and A < 0) or (r > 1 + ε_high and A > 0);
            ``approx_kl`` = mean of k3 = (r − 1) − log r, an estimate of KL(π_old ‖ π_θ) (CleanRL's approx_kl);
            ``kl`` = mean of ``kl`` (0 when not given); ``loss``. Given no active unit, the others are NaN.
    """
    reduce = get_loss_type(loss_type)
    if old_logp.shape != logp.shape or mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"policy_loss: expected logp, old_logp, mask of one shape (B, U) and advantages (B,); got logp "
            f"{tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)}, advantages "
            f"{tuple(advantages.shape)}"
        )
    if (beta != 0.0 and kl is None) or (kl is not None and kl.shape != logp.shape):
        got = None if kl is None else tuple(kl.shape)
        raise ValueError(f"policy_loss: beta={beta} needs kl of shape {tuple(logp.shape)} (as logp), got {got}")

    logp = logp.float()
    old_logp = old_logp.detach().float()
    adv = advantages.detach().float().unsqueeze(-1)
    mask = mask.detach().float()

    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = _weighted_mean((log_ratio * mask).sum(-1, keepdim=True), mask.sum(-1, keepdim=True)).expand_as(logp)
    elif importance_sampling_level != "token":
        raise ValueError(f"policy_loss: importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_unit = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_unit = per_unit * is_weights.detach().float()
    if beta != 0.0:
        per_unit = per_unit + beta * kl.float()
    loss = reduce(per_unit, mask, logp.shape[1] if max_units is None else max_units)

    with torch.no_grad():
        active = mask > 0

        def over_active(t: torch.Tensor) -> torch.Tensor:
            """Values of (B, U) ``t`` at active units; a single NaN when no unit is active."""
            values = t[active].float()
            return values if values.numel() else values.new_full((1,), float("nan"))

        r = over_active(ratio)
        clip_active = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        metrics = {
            "ratio/mean": r.mean().item(),
            "ratio/min": r.min().item(),
            "ratio/max": r.max().item(),
            "clipfrac": over_active(clip_active).mean().item(),
            "approx_kl": over_active((ratio - 1) - log_ratio).mean().item(),
            "kl": over_active(kl).mean().item() if kl is not None else 0.0,
            "loss": loss.item(),
        }
    return loss, metrics


def ratio_norm_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                         std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio of one flow step (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit
    Over-Optimization in Flow Matching via Regulated Clipping", arXiv:2510.22319, RatioNorm; as verl-omni's
    ``grpo_guard`` loss writes it).

    With the stored sample x' ~ N(μ_old, std²) and the mean-per-element Gaussian log-density of ``policies.sde``,
    log r = logp − old_logp has expectation −b, b = mean((μ_θ − μ_old)²)/(2·std²) (a left shift: the mean ratio
    sits below 1), and a spread ∝ 1/std that differs from step to step. RatioNorm removes both::

        log r̃ = (logp − old_logp + b) · std

    Shapes: logp, old_logp (B, 1); mean, old_mean (B, ...); std (B, 1, ..., 1). Returns (B, 1), with grad.
    """
    dims = tuple(range(1, mean.ndim))
    std = std.float().reshape(std.shape[0], 1)
    b = ((mean.float() - old_mean.float()) ** 2).mean(dim=dims)[:, None] / (2 * std**2)
    return (logp.float() - old_logp.float() + b) * std


def guard_step_weights(sigmas: torch.Tensor, next_sigmas: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's gradient reweighting of the trained steps (arXiv:2510.22319): step k's loss is scaled by
    1/|dt_k| = 1/(σ_k − σ'_k), which evens out the policy-gradient magnitude over noise levels. verl-omni's
    ``grpo_guard`` loss divides each step's loss by ``sqrt_dt**2`` = |dt_k| as it is; that puts the loss ~S times
    above flow-GRPO's at S steps. Here the weights are multiplied by one constant of the rollout's whole schedule
    of S steps (σ_0 > … > σ_S), its mean step Δ̄, so that a uniform schedule weights every step 1 (flow-GRPO's
    scale, and its learning rates) while the ratio between any two steps stays verl-omni's::

        w_k = Δ̄ / |dt_k|,        Δ̄ = (σ_0 − σ_S) / S

    The constant does not depend on which steps are trained, so windows at different noise levels keep their
    1/|dt| weights relative to each other (w = verl-omni's weight × Δ̄).

    Shapes: sigmas, next_sigmas (B, K) of the trained steps; schedule (S+1,) the sigmas of the rollout's schedule.
    Returns (B, K) float32.
    """
    schedule = schedule.float()
    mean_step = (schedule[0] - schedule[-1]) / (schedule.numel() - 1)
    return mean_step.to(sigmas.device) / (sigmas.float() - next_sigmas.float())
