"""Flow-SDE step kernel: one stochastic denoising step of a flow-matching sampler and its log-probability.

Convention (rectified flow, diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_σ = (1 − σ)·x₀ + σ·ε``, the
model predicts the velocity ``v = ε − x₀``, and sampling walks σ from 1 down to 0, so every step has
``dt = σ' − σ < 0`` (σ = ``sigma``, σ' = ``sigma_next``, a = ``noise_level``).

ODE (Euler), the deterministic step: ``x' = x + v·dt``.

``kind="sde"`` — Flow-SDE of Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online
RL", arXiv:2505.05470, eq. 8 / ``sde_step_with_logprob`` in flow_grpo). The reverse SDE with the same marginals
as the flow ODE is ``dx = [v − ½g²∇log p_σ(x)]dt + g dw``; for rectified flow the score is
``∇log p_σ(x) = −(x + (1 − σ)v)/σ`` (since ε̂ = x + (1 − σ)v). With ``g = s = a·√(σ/(1 − σ))`` and one
Euler–Maruyama step::

    mean = x·(1 + s²·dt/(2σ)) + v·(1 + s²(1 − σ)/(2σ))·dt
    std  = s·√(−dt)
    x'   = mean + std·ε,   ε ~ N(0, I)

Edge case σ = 1 (the first step): ``s`` has a pole, so σ' replaces σ in the denominator,
``s = a·√(σ/(1 − σ'))`` (flow_grpo uses ``sigmas[1]``, which is σ' on that step). The result stays finite.

``kind="cps"`` — Coefficients-Preserving Sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for
Reinforcement Learning with Flow Matching", arXiv:2509.05952). A DDIM-like step that re-noises the predicted
clean sample so that the noise coefficient stays exactly σ'::

    s  = σ'·sin(aπ/2),   x̂₀ = x − σv,   x̂₁ = x + (1 − σ)v
    mean = (1 − σ')·x̂₀ + √(σ'² − s²)·x̂₁,   std = s,   x' = mean + s·ε

Log-probability (both kinds), the diagonal Gaussian density of ``x'`` **averaged** (not summed) over all
non-batch dims, as flow_grpo does::

    log_prob = mean_{non-batch}[ −(x' − mean)²/(2·std²) − log std − log √(2π) ]      shape (B,)

``x'`` enters it detached, so its gradient flows through ``mean`` only (the score-function estimator).

``cps_log_prob="flow_grpo"`` (``kind="cps"`` only) gives upstream flow_grpo's CPS log-prob instead,
``mean_{non-batch}[ −(x' − mean)² ]`` (``sd3_sde_with_logprob.py``: "remove all constants"): no 1/(2·std²) and no
normaliser. Its log-ratios are the exact ones times 2·std², so only with it does flow_grpo's clip range transfer.

KL between the step Gaussians of the policy and the reference (``step_kl``), which share ``std``:
``exact`` — KL(N(μ, std²) ‖ N(μ_ref, std²)) = mean_{non-batch}[ (μ − μ_ref)² ] / (2·std²);
``flow_grpo`` — flow_grpo's ``kl_loss`` (``train_sd3.py``), which divides by 2·``std_dev_t``², where
``std_dev_t`` is what its step returns: ``s`` for Flow-SDE (not the step's std s·√(−dt)), the step std for CPS.
So for ``kind="sde"`` exact = flow_grpo / |dt| (4–21× at 10 steps), and for ``kind="cps"`` they are equal.

Shapes: ``velocity``, ``x`` are (B, ...) of any trailing shape; ``sigma``/``sigma_next`` are python floats or
(B,) tensors, broadcast over the non-batch dims. Everything is computed in float32.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, Union

import torch

from tandem.core.registry import Registry

Sigma = Union[float, torch.Tensor]
Generator = Union[torch.Generator, Sequence[torch.Generator], None]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDEKind:
    """One stochastic step rule (``decoder.sde_type``): the step Gaussian's moments and what its options mean.

    ``max_noise_level``: the largest valid a. ``has_cps_log_prob``: whether ``cps_log_prob`` applies to it.
    ``moments(x, v, s0, s1, a)``: x, v (B, ...) float32; s0, s1 (B, 1, ..., 1) σ and σ'; returns the step's mean
    (B, ...) and std (B, 1, ..., 1). ``flow_grpo_kl_factor(s0, s1)``: flow_grpo's KL over the exact one."""

    max_noise_level = math.inf
    has_cps_log_prob = False

    def moments(self, x: torch.Tensor, v: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor,
                a: float) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def flow_grpo_kl_factor(self, s0: torch.Tensor, s1: torch.Tensor) -> Union[float, torch.Tensor]:
        return 1.0


SDE_KINDS: Registry[type] = Registry("SDE kind")
"""SDEKind subclasses by ``decoder.sde_type``; register another with ``@SDE_KINDS.register("name")``."""


@SDE_KINDS.register("sde")
class FlowSDE(SDEKind):
    """Flow-GRPO's Flow-SDE (module docstring); flow_grpo's KL divides by 2·s² = 2·std²/|dt|."""

    def moments(self, x, v, s0, s1, a):
        dt = s1 - s0
        s = a * torch.sqrt(s0 / (1 - torch.where(s0 == 1, s1, s0)))
        return x * (1 + s**2 * dt / (2 * s0)) + v * (1 + s**2 * (1 - s0) / (2 * s0)) * dt, s * torch.sqrt(-dt)

    def flow_grpo_kl_factor(self, s0, s1):
        return s0 - s1


@SDE_KINDS.register("cps")
class CoefficientsPreserving(SDEKind):
    """Coefficients-Preserving Sampling (module docstring); flow_grpo's KL is the exact one."""

    max_noise_level = 1.0
    has_cps_log_prob = True

    def moments(self, x, v, s0, s1, a):
        std = s1 * math.sin(a * math.pi / 2)
        x0_hat, x1_hat = x - s0 * v, x + (1 - s0) * v
        return (1 - s1) * x0_hat + torch.sqrt(s1**2 - std**2) * x1_hat, std


LogDensity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_next (B, ...) detached, mean (B, ...), std (B, 1, ..., 1)) -> per-element log-density (B, ...)."""

CPS_LOG_PROBS: Registry[LogDensity] = Registry("CPS log-prob")


@CPS_LOG_PROBS.register("exact")
def _gaussian_log_density(x_next, mean, std):
    return -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI


@CPS_LOG_PROBS.register("flow_grpo")
def _flow_grpo_cps_log_density(x_next, mean, std):
    return -((x_next - mean) ** 2)


KLForm = Callable[[torch.Tensor, SDEKind, torch.Tensor, torch.Tensor], torch.Tensor]
"""(exact KL (B,), the step's SDE kind, σ (B,), σ' (B,)) -> the KL term (B,) in this form."""

KL_FORMS: Registry[KLForm] = Registry("KL form")


@KL_FORMS.register("exact")
def _exact_kl(kl, kind, sigma, sigma_next):
    return kl


@KL_FORMS.register("flow_grpo")
def _flow_grpo_kl(kl, kind, sigma, sigma_next):
    return kl * kind.flow_grpo_kl_factor(sigma, sigma_next)


def _per_sample(value: Sigma, x: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor as float32 of shape (B, 1, ..., 1), broadcastable against ``x`` (B, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _randn(shape: torch.Size, generator: Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` on ``device``, as diffusers' ``randn_tensor`` draws it.

    Noise is drawn on the generator's own device (then moved), so a CPU generator gives the same noise on any
    device; a list of B generators draws sample ``i`` from ``generator[i]``.
    """
    if isinstance(generator, (list, tuple)):
        return torch.cat([_randn((1, *shape[1:]), g, device) for g in generator])
    src = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=src, dtype=torch.float32).to(device)


def _mean_over_non_batch(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B,): mean over every dim but the first."""
    return t.mean(dim=tuple(range(1, t.ndim)))


def ode_step(velocity: torch.Tensor, x: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """Deterministic Euler step of the flow ODE, ``x + v·dt`` with ``dt = σ' − σ`` (in float32).

    Bit-identical to ``FlowMatchEulerDiscreteScheduler.step`` on float32 sigmas. Used outside the SDE window
    (MixGRPO-style ODE/SDE mixing) and for eval sampling.

    Shapes: velocity, x (B, ...); sigma, sigma_next float or (B,). Returns (B, ...) float32.
    """
    x = x.float()
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return x + velocity.float() * dt


def sde_step(
    velocity: torch.Tensor,
    x: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
    kind: str = "sde",
    cps_log_prob: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic step σ → σ' and the log-probability of its sample (formulas in the module docstring).

    Args:
        velocity: (B, ...) model output v (cast to float32).
        x: (B, ...) current latent x_σ.
        sigma, sigma_next: float or (B,) tensor, σ > σ'.
        noise_level: a ≥ 0 (for ``"cps"`` also ≤ 1). ``0`` gives exactly the Euler step ``x + v·dt``.
        prev_sample: (B, ...) the sample actually taken (training replays a rollout); replaces the draw.
        generator: torch.Generator, or a list of B generators, for the noise ε.
        kind: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving).
        cps_log_prob: ``"exact"`` or ``"flow_grpo"`` (upstream's −(x' − mean)², module docstring); ``kind="cps"`` only.

    Returns:
        x_next: (B, ...) float32 sample x_σ' (= ``prev_sample`` when given).
        log_prob: (B,) float32 mean per-element Gaussian log-density of ``x_next``; zeros when
            ``noise_level == 0`` (undefined there, to be ignored). Also undefined when ``std`` is 0 for another
            reason (``"cps"`` stepping to σ' = 0): never train that step.
        mean: (B, ...) float32 mean of x_σ'.
        std: (B, 1, ..., 1) float32 standard deviation, broadcastable against ``mean``.
    """
    rule, log_density = SDE_KINDS.get(kind)(), CPS_LOG_PROBS.get(cps_log_prob)
    a = float(noise_level)
    if not 0 <= a <= rule.max_noise_level:
        bound = f"[0, {rule.max_noise_level:g}]" if math.isfinite(rule.max_noise_level) else ">= 0"
        raise ValueError(f"sde_step: noise_level={noise_level} is out of range for kind={kind!r}; use {bound}")
    x = x.float()
    v = velocity.float()
    s0 = _per_sample(sigma, x)
    s1 = _per_sample(sigma_next, x)

    if a == 0:
        mean = ode_step(v, x, sigma, sigma_next)
        std = torch.zeros_like(s0)
        x_next = mean if prev_sample is None else prev_sample.float()
        return x_next, x.new_zeros(x.shape[0]), mean, std

    mean, std = rule.moments(x, v, s0, s1, a)
    if prev_sample is None:
        x_next = mean + std * _randn(x.shape, generator, x.device)
    else:
        x_next = prev_sample.float()
    if not rule.has_cps_log_prob:
        log_density = _gaussian_log_density
    return x_next, _mean_over_non_batch(log_density(x_next.detach(), mean, std)), mean, std


def mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Exact KL between two step Gaussians that share ``std``: mean over non-batch dims of (μ − μ_ref)²/(2·std²)
    (for N(μ, std²) and N(μ_ref, std²) the per-element KL is exactly that).

    Shapes: mean, ref_mean (B, ...); std broadcastable against them, e.g. (B, 1, ..., 1). Returns (B,).
    """
    return _mean_over_non_batch((mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2))


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
            kind: str = "sde", form: str = "exact") -> torch.Tensor:
    """The flow-stage KL penalty of one step in ``form`` ``"exact"`` or ``"flow_grpo"`` (module docstring).

    For ``kind="sde"``, flow_grpo's divides by 2·s² = 2·std²/|dt|, i.e. it is the exact KL times |dt| = σ − σ'.
    Shapes as ``mean_kl``; sigma, sigma_next float or (B,). Returns (B,).
    """
    kl = mean_kl(mean, ref_mean, std)
    return KL_FORMS.get(form)(kl, SDE_KINDS.get(kind)(), torch.as_tensor(sigma, dtype=torch.float32, device=kl.device),
                              torch.as_tensor(sigma_next, dtype=torch.float32, device=kl.device))
