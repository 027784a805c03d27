"""DPM-Solver++(2M), the second-order multistep ODE solver (``decoder.ode_solver: dpm2m``).

Convention as in ``policies.sde``: x_σ = (1 − σ)·x₀ + σ·ε, v = ε − x₀, so the data prediction is x̂₀ = x − σ·v.
With α = 1 − σ and λ = log(α/σ) (half log-SNR), DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095, Alg. 2 "2M", midpoint form as in
diffusers' ``DPMSolverMultistepScheduler`` with ``prediction_type="flow_prediction"``, ``use_flow_sigmas``)
steps σ_i → σ_{i+1} with h = λ_{i+1} − λ_i, h₀ = λ_i − λ_{i−1}, r = h₀/h::

    D        = (1 + 1/(2r))·x̂₀_i − 1/(2r)·x̂₀_{i−1}
    x_{i+1}  = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h} − 1)·D

Its first-order form (D = x̂₀_i) is exactly the Euler step x + (σ_{i+1} − σ_i)·v, which is used where no
previous data prediction exists (the first step) and on the final step to σ = 0 (λ = ∞; diffusers'
``lower_order_final``). MixGRPO-Flash (Li et al. 2025, arXiv:2507.21802, §3.4) samples the steps outside its SDE
window with such a higher-order solver; its SDE steps still feed the solver's history (x̂₀ of each step): the
flow policy calls ``step`` on an SDE step too and keeps its state (``policies.ode_solvers``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from tandem.policies.ode_solvers import ODE_SOLVERS, ODESolver
from tandem.policies.sde import ode_step


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm2m_step(velocity: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float,
               previous: Optional[Tuple[torch.Tensor, float]]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, float]]:
    """One DPM-Solver++(2M) step σ → σ' (module docstring), float32.

    Args:
        velocity, x: (B, ...) model velocity and latent at σ.
        sigma, sigma_next: floats (or 0-d tensors), 1 ≥ σ > σ' ≥ 0.
        previous: (x̂₀, σ) of the previous ODE step, or None (then the step is first order = Euler).

    Returns:
        x_next: (B, ...) float32 latent at σ'.
        current: (x̂₀, σ) of this step, to pass as ``previous`` to the next one.
    """
    x, v = x.float(), velocity.float()
    s0, s1 = torch.as_tensor(sigma, dtype=torch.float32), torch.as_tensor(sigma_next, dtype=torch.float32)
    x0 = x - s0 * v
    if previous is None or float(s1) == 0.0:
        return ode_step(v, x, s0, s1), (x0, s0)
    x0_prev, s_prev = previous
    h = _lam(s1) - _lam(s0)
    r = (_lam(s0) - _lam(torch.as_tensor(s_prev, dtype=torch.float32))) / h
    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (s1 / s0) * x - (1 - s1) * torch.expm1(-h) * d, (x0, s0)


@ODE_SOLVERS.register("dpm2m")
class DPMSolver2M(ODESolver):
    """``dpm2m_step`` as an ``ODESolver``; its state is the previous step's (x̂₀, σ)."""

    def step(self, velocity, x, sigma, sigma_next, state):
        return dpm2m_step(velocity, x, sigma, sigma_next, state)
