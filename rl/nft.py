"""DiffusionNFT's loss on the forward process (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement
with Forward Process", arXiv:2509.16117, eq. 6-8; NVlabs/DiffusionNFT).

A rollout yields clean samples x₀ (by any solver, no log-probs). Each is noised along the forward process at
a timestep σ of the rollout schedule, x_σ = (1 − σ)·x₀ + σ·ε, whose flow-matching target is v = ε − x₀. The
reward enters as an optimality probability r ∈ [0, 1]; with the group-normalised advantage A (``rl.advantages``)
and the normaliser Z = ``grpo.adv_clip_max``::

    r = 1/2 + 1/2 · clip(A / Z, −1, 1)

The old policy v_old (the weights that sampled the rollout) and the trained one v_θ define two implicit policies,
β = ``grpo.nft_beta``::

    v⁺ = (1 − β)·v_old + β·v_θ        v⁻ = (1 + β)·v_old − β·v_θ
    ℓ  = [ r·‖v⁺ − v‖² + (1 − r)·‖v⁻ − v‖² ] / β          (‖·‖² = mean over elements)

At θ = θ_old the gradient w.r.t. v_θ is 2(2r − 1)(v_old − v): samples with r > 1/2 pull the velocity towards
their target, those with r < 1/2 push it away. The division by β (as in the reference implementation) keeps that
gradient independent of β. Not taken from the reference implementation: its adaptive per-sample weighting of the
loss in x₀-space and its soft (EMA) update of the old policy; here the old policy is the rollout's weights.
"""

from __future__ import annotations

import torch


def optimality_probability(advantages: torch.Tensor, scale: float) -> torch.Tensor:
    """r = 1/2 + 1/2·clip(A / scale, −1, 1); advantages (B,) -> (B,) float32 in [0, 1]."""
    return 0.5 + 0.5 * torch.clamp(advantages.float() / scale, -1.0, 1.0)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-sample DiffusionNFT loss ℓ (module docstring).

    Args:
        v_theta: (B, ...) velocity of the trained model at (x_σ, σ), with grad.
        v_old: (B, ...) velocity of the old (sampling) model there, no grad.
        target: (B, ...) flow-matching target ε − x₀.
        r: (B,) optimality probabilities in [0, 1].
        beta: guidance strength β > 0.

    Returns (B,) float32, differentiable w.r.t. ``v_theta``.
    """
    v_theta, v_old, target = v_theta.float(), v_old.detach().float(), target.float()
    dims = tuple(range(1, v_theta.ndim))
    positive = ((1 - beta) * v_old + beta * v_theta - target).pow(2).mean(dim=dims)
    negative = ((1 + beta) * v_old - beta * v_theta - target).pow(2).mean(dim=dims)
    r = r.detach().float()
    return (r * positive + (1 - r) * negative) / beta
