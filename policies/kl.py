"""Per-unit KL estimates of the AR policy against its reference."""

from __future__ import annotations

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-unit KL(π_θ ‖ π_ref) estimate k3 = exp(ref − logp) − (ref − logp) − 1 (Schulman 2020, "Approximating
    KL divergence"; TRL's ``per_token_kl``). Unbiased for samples from π_θ, ≥ 0, and 0 iff logp == ref_logp.

    Shapes: logp, ref_logp (B, U) → (B, U). Gradient flows through both arguments; pass ``ref_logp`` detached.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1
