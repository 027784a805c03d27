"""Pure-math checks of the Flow-SDE step kernel (policies/sde.py) against independent closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tandem.policies.sde import mean_kl, ode_step, sde_step

KINDS = ("sde", "cps")
STEPS = [(1.0, 0.9), (0.75, 0.5), (0.3, 0.29), (0.05, 0.0)]


def _inputs(shape=(3, 4, 5, 6), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _reference_f64(v, x, sigma, sigma_next, a, kind):
    """Mean and std of the step in float64 numpy, written from docs/design.md, section 3 and not from the kernel."""
    v, x = v.double().numpy(), x.double().numpy()
    dt = sigma_next - sigma
    if kind == "sde":
        s = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
        mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, s * math.sqrt(-dt)
    s = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - s**2) * (x + (1 - sigma) * v)
    return mean, s


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma,sigma_next", STEPS)
def test_noise_zero_is_exact_euler_step(kind, sigma, sigma_next):
    v, x = _inputs()
    dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
    x_next, log_prob, mean, std = sde_step(v, x, sigma, sigma_next, 0.0, kind=kind)
    assert torch.equal(x_next, x + v * dt)
    assert torch.equal(mean, x + v * dt)
    assert torch.equal(ode_step(v, x, sigma, sigma_next), x + v * dt)
    assert torch.equal(std, torch.zeros(3, 1, 1, 1))
    assert torch.equal(log_prob, torch.zeros(3))


def test_noise_zero_matches_diffusers_scheduler_bit_exact():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_inference_steps=6)
    v, x = _inputs(seed=1)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, t, x).prev_sample
        x_next, *_ = sde_step(v, x, scheduler.sigmas[i], scheduler.sigmas[i + 1], 0.0)
        assert torch.equal(x_next, expected)
        x = x_next


def test_noise_zero_per_sample_sigmas_and_low_precision_inputs():
    v, x = _inputs(dtype=torch.bfloat16)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.8, 0.5, 0.0])
    x_next, *_ = sde_step(v, x, sigma, sigma_next, 0.0)
    assert x_next.dtype == torch.float32
    assert torch.equal(x_next, x.float() + v.float() * (sigma_next - sigma).view(3, 1, 1, 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma,sigma_next", STEPS[:3])
def test_log_prob_matches_normal_and_float64_closed_form(kind, sigma, sigma_next):
    v, x = _inputs()
    a = 0.7
    g = torch.Generator().manual_seed(3)
    x_next, log_prob, mean, std = sde_step(v, x, sigma, sigma_next, a, generator=g, kind=kind)

    torch_ref = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, torch_ref, rtol=1e-5, atol=1e-5)

    mean64, std64 = _reference_f64(v, x, sigma, sigma_next, a, kind)
    np.testing.assert_allclose(mean.numpy(), mean64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), np.full((3, 1, 1, 1), std64), rtol=1e-5)
    lp64 = norm.logpdf(x_next.double().numpy(), loc=mean64, scale=std64).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(log_prob.numpy(), lp64, rtol=1e-5, atol=1e-5)


def test_hand_computed_sde_and_cps_steps():
    v, x = torch.full((1, 1), 2.0), torch.full((1, 1), 1.0)
    # sde, σ=0.5 → σ'=0.25, a=1: s=1, dt=-0.25, mean = 0.75x − 0.375v = 0, std = √0.25
    _, _, mean, std = sde_step(v, x, 0.5, 0.25, 1.0)
    torch.testing.assert_close(mean, torch.zeros(1, 1))
    torch.testing.assert_close(std, torch.full((1, 1), 0.5))
    # cps, same step, a=0.5: s = 0.25·sin(π/4), x̂₀ = 0, x̂₁ = 2, mean = √(0.0625 − s²)·2 = 2√0.03125
    _, _, mean, std = sde_step(v, x, 0.5, 0.25, 0.5, kind="cps")
    torch.testing.assert_close(mean, torch.full((1, 1), 2 * math.sqrt(0.03125)))
    torch.testing.assert_close(std, torch.full((1, 1), 0.25 * math.sin(math.pi / 4)))
    # cps with a=1 keeps no deterministic noise: mean = (1 − σ')·x̂₀
    _, _, mean, _ = sde_step(v, torch.full((1, 1), 3.0), 0.5, 0.25, 1.0, kind="cps")
    torch.testing.assert_close(mean, torch.full((1, 1), 0.75 * (3.0 - 0.5 * 2.0)))


@pytest.mark.parametrize("kind", KINDS)
def test_prev_sample_reproduces_log_prob(kind):
    v, x = _inputs()
    x_next, log_prob, mean, std = sde_step(v, x, 0.6, 0.4, 0.8, generator=torch.Generator().manual_seed(5), kind=kind)
    replay, replay_lp, replay_mean, replay_std = sde_step(v, x, 0.6, 0.4, 0.8, prev_sample=x_next, kind=kind)
    assert torch.equal(replay, x_next)
    assert torch.equal(replay_lp, log_prob)
    assert torch.equal(replay_mean, mean) and torch.equal(replay_std, std)
    # the replayed value is really the one used: another sample gets another log-prob
    _, other_lp, _, _ = sde_step(v, x, 0.6, 0.4, 0.8, prev_sample=x_next + std, kind=kind)
    assert not torch.allclose(other_lp, log_prob)


@pytest.mark.parametrize("kind", KINDS)
def test_generator_determinism(kind):
    v, x = _inputs()

    def draw(seed):
        return sde_step(v, x, 0.6, 0.4, 0.8, generator=torch.Generator().manual_seed(seed), kind=kind)[0]

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # a list of per-sample generators: sample i depends on generator i only
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    per_sample = sde_step(v, x, 0.6, 0.4, 0.8, generator=generators, kind=kind)[0]
    alone = sde_step(v[1:2], x[1:2], 0.6, 0.4, 0.8, generator=torch.Generator().manual_seed(2), kind=kind)[0]
    assert torch.equal(per_sample[1:2], alone)


def test_sigma_one_edge_case_is_finite():
    v, x = _inputs()
    a = 0.7
    x_next, log_prob, mean, std = sde_step(v, x, 1.0, 0.9, a, generator=torch.Generator().manual_seed(0))
    for t in (x_next, log_prob, mean, std):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(std, torch.full((3, 1, 1, 1), a * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1)))
    # per-sample sigmas mixing σ = 1 with σ < 1 use σ' only on the σ = 1 rows
    sigma, sigma_next = torch.tensor([1.0, 0.5, 0.5]), torch.tensor([0.9, 0.4, 0.4])
    _, lp, _, std = sde_step(v, x, sigma, sigma_next, a, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(std.flatten()[1:], torch.full((2,), a * math.sqrt(0.1)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 16, 8), (2, 4, 6, 6)])
def test_shapes_and_dtypes(kind, shape):
    v, x = _inputs(shape, dtype=torch.float16)
    x_next, log_prob, mean, std = sde_step(v, x, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3]), 0.5, kind=kind)
    assert x_next.shape == mean.shape == shape
    assert std.shape == (2,) + (1,) * (len(shape) - 1)
    assert log_prob.shape == (2,)
    assert {t.dtype for t in (x_next, log_prob, mean, std)} == {torch.float32}


@pytest.mark.parametrize("kind", KINDS)
def test_samples_have_the_stated_mean_and_std(kind):
    v, x = _inputs((2, 200_000))
    x_next, _, mean, std = sde_step(v, x, 0.7, 0.5, 0.9, generator=torch.Generator().manual_seed(11), kind=kind)
    z = (x_next - mean) / std  # should be N(0, 1) per element
    n = z.shape[1]
    assert z.mean(dim=1).abs().max() < 5 / math.sqrt(n)
    assert (z.std(dim=1) - 1).abs().max() < 5 / math.sqrt(2 * n)


def test_log_prob_gradient_flows_through_the_mean_only():
    v, x = _inputs((2, 50))
    v.requires_grad_(True)
    sigma, sigma_next, a = 0.6, 0.4, 0.8
    x_next, log_prob, mean, std = sde_step(v, x, sigma, sigma_next, a, generator=torch.Generator().manual_seed(2))
    log_prob.sum().backward()
    # d/dv of mean_i[−(x'−μ)²/(2s²)] with x' fixed = (x'−μ)/(s²·N) · dμ/dv,
    # where dμ/dv = (1 + s²(1−σ)/(2σ))·dt
    s2 = a**2 * sigma / (1 - sigma)
    dmean_dv = (1 + s2 * (1 - sigma) / (2 * sigma)) * (sigma_next - sigma)
    expected = (x_next - mean).detach() / (std**2 * 50) * dmean_dv
    torch.testing.assert_close(v.grad, expected)


def test_mean_kl():
    v, x = _inputs()
    _, _, mean, std = sde_step(v, x, 0.6, 0.4, 0.8)
    assert torch.equal(mean_kl(mean, mean.clone(), std), torch.zeros(3))
    ref_mean = mean + 0.1 * torch.randn_like(mean)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(ref_mean, std)
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mean_kl(mean, ref_mean, std), expected)
    assert (mean_kl(mean, ref_mean, std) > 0).all()


def test_bad_arguments_teach():
    v, x = _inputs()
    with pytest.raises(ValueError, match="'ddim'; allowed SDE kinds: cps, sde"):
        sde_step(v, x, 0.6, 0.4, 0.5, kind="ddim")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sde_step(v, x, 0.6, 0.4, 1.5, kind="cps")
    with pytest.raises(ValueError, match="noise_level=-0.1"):
        sde_step(v, x, 0.6, 0.4, -0.1)


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.853), (0.5, 0.417), (0.4, 0.131)])
def test_kl_forms_exact_is_flow_grpo_over_abs_dt(sigma, sigma_next):
    """flow_grpo's kl_loss divides ||mean - mean_ref||^2 by 2 std_dev_t^2 with std_dev_t = s (what its
    sde_step_with_logprob returns), the exact KL by 2 (s sqrt(-dt))^2: their ratio is 1/|dt| for Flow-SDE, 1 for CPS."""
    from tandem.policies.sde import step_kl

    v, x = _inputs()
    v_ref = v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    for kind in KINDS:
        _, _, mean, std = sde_step(v, x, sigma, sigma_next, 0.7, kind=kind)
        _, _, ref, _ = sde_step(v_ref, x, sigma, sigma_next, 0.7, kind=kind)
        exact = step_kl(mean, ref, std, sigma, sigma_next, kind, "exact")
        flow = step_kl(mean, ref, std, sigma, sigma_next, kind, "flow_grpo")
        # flow_grpo's formula, written from train_sd3.py: s = a sqrt(sigma / (1 - sigma)) for sde, sigma' sin(a pi/2) for cps
        s = 0.7 * math.sqrt(sigma / (1 - sigma)) if kind == "sde" else sigma_next * math.sin(0.7 * math.pi / 2)
        upstream = ((mean.double() - ref.double()) ** 2).mean(dim=(1, 2, 3)) / (2 * s**2)
        torch.testing.assert_close(flow.double(), upstream, rtol=1e-5, atol=0)
        ratio = 1 / (sigma - sigma_next) if kind == "sde" else 1.0
        torch.testing.assert_close(exact.double() / flow.double(), torch.full((3,), ratio, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("sigma,sigma_next", [(0.75, 0.5), (0.3, 0.1)])
def test_cps_flow_grpo_log_prob_is_minus_squared_error(sigma, sigma_next):
    """Upstream flow_grpo's CPS log-prob: mean over dims of -(x' - mean)^2; its log-ratios are the exact ones
    times 2 std^2."""
    v, x = _inputs()
    g = torch.Generator().manual_seed(5)
    x_next, exact, mean, std = sde_step(v, x, sigma, sigma_next, 0.7, generator=g, kind="cps")
    _, upstream, mean2, _ = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=x_next, kind="cps", cps_log_prob="flow_grpo")
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(upstream.double(), -((x_next.double() - mean.double()) ** 2).mean(dim=(1, 2, 3)))
    v2 = v + 0.05
    _, exact2, _, _ = sde_step(v2, x, sigma, sigma_next, 0.7, prev_sample=x_next, kind="cps")
    _, upstream2, _, _ = sde_step(v2, x, sigma, sigma_next, 0.7, prev_sample=x_next, kind="cps", cps_log_prob="flow_grpo")
    s2 = (sigma_next * math.sin(0.7 * math.pi / 2)) ** 2
    torch.testing.assert_close((exact2 - exact).double(), (upstream2 - upstream).double() / (2 * s2), rtol=1e-4, atol=1e-6)
    # the Flow-SDE kind ignores the option (flow_grpo uses the exact density there too)
    _, sde_a, _, _ = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=x_next, kind="sde")
    _, sde_b, _, _ = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=x_next, kind="sde", cps_log_prob="flow_grpo")
    assert torch.equal(sde_a, sde_b)


def test_a_registered_sde_kind_is_stepped_and_scored_by_sde_step():
    """A kind registered from outside gives sde_step its moments; the sample and log-prob follow from them."""
    from tandem.policies.sde import SDE_KINDS, SDEKind

    @SDE_KINDS.register("test_euler_plus_noise")
    class EulerPlusNoise(SDEKind):
        def moments(self, x, v, s0, s1, a):
            return x + v * (s1 - s0), torch.full_like(s0, a)

    try:
        v, x = _inputs()
        x_next, logp, mean, std = sde_step(v, x, 0.6, 0.4, 0.3, generator=torch.Generator().manual_seed(0),
                                           kind="test_euler_plus_noise")
        torch.testing.assert_close(mean, ode_step(v, x, 0.6, 0.4))
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x_next, mean + 0.3 * eps)
        expected = torch.distributions.Normal(mean, 0.3).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(logp, expected)
    finally:
        SDE_KINDS.unregister("test_euler_plus_noise")
