"""DiffusionNFT's loss on the forward process (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement
with Forward Process", arXiv:2509.16117, eq. 6-8; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``, "the
reference" below).

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
gradient independent of β.

**Velocity space or x₀ space** (``grpo.nft_adaptive_weight``). The reference measures the error of the implied
clean sample x̂₀ = x_σ − σ·v⁺ instead, x̂₀ − x₀ = σ·(v − v⁺), so its squared error is σ² times the one above,
and divides it by its own detached mean absolute value w = max(mean|x̂₀ − x₀|, 1e-5) ("adaptive weighting")::

    ℓ⁺_adaptive = mean((x̂₀⁺ − x₀)²) / w⁺ = σ · ‖v⁺ − v‖² / mean|v⁺ − v|        (ℓ⁻ alike, with v⁻)

So its per-sample weight is σ / mean|v^± − v|, against 1 here by default: noisier timesteps and samples whose
implicit policy is already close to the target weigh more.

**Policy term against KL** (``grpo.nft_scale_policy_loss``). The reference's loss is Z·mean(ℓ) + β_KL·KL with
KL = mean((v_θ − v_ref)²) and β_KL its ``train.beta``; tandem's default is mean(ℓ) + ``grpo.beta``·KL, the
reference's divided by Z, so the same balance is ``grpo.beta`` = ``train.beta`` / Z (AdamW hardly sees the overall
scale); with the option, the policy term is multiplied by Z and ``grpo.beta`` = ``train.beta``.

**Draws per epoch** (``grpo.nft_fresh_noise``). The reference draws new noise on every pass and new timesteps for
every inner epoch; tandem draws each sample's timesteps and noise once per rollout, or once per epoch of
``grpo.num_iterations`` with the option (the same with one epoch).

**Old policy** (``grpo.nft_old_decay_type``). The reference samples its rollouts with an "old" copy of the trained
weights and takes v_old from it; after each rollout's updates, old ← d·old + (1 − d)·θ with d from the number s
of optimizer steps so far (``tandem.policies.ema.old_policy_decay``; the flow policy keeps that copy). Type 0
(d = 0) makes the old policy the weights that sampled the rollout, tandem's default; the released configs use
types 1 and 2.
"""

from __future__ import annotations

import torch


def optimality_probability(advantages: torch.Tensor, scale: float) -> torch.Tensor:
    """r = 1/2 + 1/2·clip(A / scale, −1, 1); advantages (B,) -> (B,) float32 in [0, 1]."""
    return 0.5 + 0.5 * torch.clamp(advantages.float() / scale, -1.0, 1.0)


def _squared_error(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """(B,) mean((pred − target)²) in velocity space, or with ``sigma`` (B,) the reference's adaptive x₀-space form
    mean(e²) / max(mean|e|, 1e-5), e = σ·(pred − target), the weight detached and computed in float64."""
    dims = tuple(range(1, pred.ndim))
    if sigma is None:
        return (pred - target).pow(2).mean(dim=dims)
    error = sigma.float().view(-1, *[1] * (pred.ndim - 1)) * (pred - target)
    weight = error.detach().double().abs().mean(dim=dims).clamp(min=1e-5)
    return error.pow(2).mean(dim=dims) / weight.float()


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor,
             beta: float, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample DiffusionNFT loss ℓ (module docstring).

    Args:
        v_theta: (B, ...) velocity of the trained model at (x_σ, σ), with grad.
        v_old: (B, ...) velocity of the old (sampling) model there, no grad.
        target: (B, ...) flow-matching target ε − x₀.
        r: (B,) optimality probabilities in [0, 1].
        beta: guidance strength β > 0.
        sigma: (B,) the samples' σ for the reference's adaptive x₀-space weighting; None = velocity space.

    Returns (B,) float32, differentiable w.r.t. ``v_theta``.
    """
    v_theta, v_old, target = v_theta.float(), v_old.detach().float(), target.float()
    positive = _squared_error((1 - beta) * v_old + beta * v_theta, target, sigma)
    negative = _squared_error((1 + beta) * v_old - beta * v_theta, target, sigma)
    r = r.detach().float()
    return (r * positive + (1 - r) * negative) / beta
