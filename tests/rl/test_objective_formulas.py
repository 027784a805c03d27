"""The objectives' formulas on fixed tensors, each beside the paper's equation or the reference project's code
transcribed into the test (its source named in the helper): DiffusionNFT's loss, adaptive weight, ×Z / KL terms
and old-policy decay (NVlabs DiffusionNFT), GRPO-Guard's ratio normalisation and step weights (verl-omni), GSPO's
sequence ratio, MixGRPO's sliding window (Tencent-Hunyuan MixGRPO), the DPM-Solver++(2M) ODE step (diffusers'
scheduler, same sigmas) and the reward std against flow_grpo's stat tracker."""

import math

import numpy as np
import pytest
import torch

from tandem.policies.flow import sliding_window, trained_step_indices
from tandem.policies.ode_solvers.dpm2m import dpm2m_step
from tandem.policies.sde import ode_step, sde_step
from tandem.rl.config import DecoderConfig
from tandem.rl.losses import guard_step_weights, policy_loss, ratio_norm_log_ratio
from tandem.policies.ema import EMA, old_policy_decay
from tandem.rl.nft import nft_loss, optimality_probability


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ DiffusionNFT
def test_nft_loss_is_its_closed_form():
    v, v_old, target = _t(3, 2, 4, 4, seed=1), _t(3, 2, 4, 4, seed=2), _t(3, 2, 4, 4, seed=3)
    adv = torch.tensor([2.5, -7.0, 0.0])
    r = optimality_probability(adv, 5.0)
    assert r.tolist() == [0.75, 0.0, 0.5]
    beta = 0.3
    got = nft_loss(v.float(), v_old.float(), target.float(), r, beta)
    for i in range(3):  # paper eq.: r‖v⁺ − v‖² + (1 − r)‖v⁻ − v‖², v± from v_old and v_θ; divided by β
        pos = beta * v[i] + (1 - beta) * v_old[i]
        neg = (1 + beta) * v_old[i] - beta * v[i]
        want = (r[i].item() * ((pos - target[i]) ** 2).mean() + (1 - r[i].item()) * ((neg - target[i]) ** 2).mean()) / beta
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)


def test_nft_gradient_at_the_old_policy_pulls_positives_and_pushes_negatives():
    v_old, target = _t(2, 8, seed=4).float(), _t(2, 8, seed=5).float()
    v = v_old.clone().requires_grad_(True)
    r = torch.tensor([1.0, 0.0])
    nft_loss(v, v_old, target, r, beta=0.7).sum().backward()
    # d/dv at v = v_old: 2(2r − 1)(v_old − target)/numel, whatever β
    want = 2 * (2 * r[:, None] - 1) * (v_old - target) / 8
    assert torch.allclose(v.grad, want, atol=1e-6)


def diffusionnft_reference_loss(x0, noise, t, forward_prediction, old_prediction, ref_forward_prediction, advantages,
                                beta, adv_clip_max, kl_beta):
    """NVlabs DiffusionNFT, scripts/train_nft_sd3.py, the training loop's loss for one timestep of a micro-batch
    (adv_mode "all"): implicit policies, "adaptive weighting" in x0 space, policy loss × adv_clip_max, KL term."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    xt = (1 - t_expanded) * x0 + t_expanded * noise
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (torch.abs(x0_prediction.double() - x0.double())
                         .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return policy_loss + kl_beta * torch.mean(kl_div_loss)


def diffusionnft_return_decay(step, decay_type):
    """NVlabs DiffusionNFT, scripts/train_nft_sd3.py, return_decay."""
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    elif decay_type == 2:
        flat, uprate, uphold = 75, 0.0075, 0.999
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@pytest.mark.parametrize("beta, kl_beta", [(1.0, 1e-4), (0.1, 0.01)])
def test_nft_adaptive_weight_scaled_policy_and_kl_are_the_references(beta, kl_beta):
    x0, noise = _t(4, 2, 4, 4, seed=20).float(), _t(4, 2, 4, 4, seed=21).float()
    v_old, v_ref = _t(4, 2, 4, 4, seed=22).float(), _t(4, 2, 4, 4, seed=23).float()
    t = torch.tensor([0.9, 0.6, 0.3, 0.05])
    adv = torch.tensor([7.0, 1.2, -0.4, -3.0])
    z = 5.0
    forward_prediction = (v_old + 0.1 * _t(4, 2, 4, 4, seed=24).float()).requires_grad_(True)
    want = diffusionnft_reference_loss(x0, noise, t, forward_prediction, v_old, v_ref, adv, beta, z, kl_beta)
    want.backward()
    # tandem: the objective's terms, with nft_adaptive_weight, nft_scale_policy_loss and grpo.beta = kl_beta
    v = forward_prediction.detach().clone().requires_grad_(True)
    r = optimality_probability(adv, z)
    per_sample = nft_loss(v, v_old, noise - x0, r, beta, sigma=t) * z
    kl = (v - v_ref).pow(2).mean(dim=(1, 2, 3))
    got = (per_sample + kl_beta * kl).mean()
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(v.grad, forward_prediction.grad, rtol=1e-4, atol=1e-7)
    # the default: velocity space, unweighted; per sample the reference is σ·‖v± − v‖²/mean|v± − v| of it
    plain = nft_loss(v.detach(), v_old, noise - x0, r, beta)
    assert not torch.allclose(plain * z, per_sample.detach(), rtol=1e-2)


def test_nft_old_policy_decay_and_blend_are_the_references():
    for decay_type in (0, 1, 2):
        for step in [0, 1, 10, 74, 75, 76, 200, 500, 1000, 5000]:
            assert old_policy_decay(step, decay_type) == diffusionnft_return_decay(step, decay_type)
    params = [torch.nn.Parameter(_t(3, 4, seed=25).float()), torch.nn.Parameter(_t(5, seed=26).float())]
    old = EMA([("a", params[0]), ("b", params[1])], decay=0.0)
    start = [s.clone() for s in old.shadow]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    for decay in (0.3, 0.0):
        before = [s.clone() for s in old.shadow]
        old.blend(params, decay)
        for tgt, src, b in zip(old.shadow, params, before):  # tgt.data * decay + src.data * (1.0 - decay)
            torch.testing.assert_close(tgt, b * decay + src.detach() * (1.0 - decay))
    assert all(torch.equal(s, p.detach()) for s, p in zip(old.shadow, params))  # d = 0: the weights exactly
    assert not torch.equal(start[0], old.shadow[0])


# ------------------------------------------------------------------------------------------------ GRPO-Guard
def test_ratio_norm_against_its_formula_and_one_on_policy():
    mean, old_mean = _t(4, 2, 3, 3, seed=6).float(), _t(4, 2, 3, 3, seed=7).float()
    std = torch.tensor([0.3, 0.1, 0.05, 0.2]).view(4, 1, 1, 1)
    logp, old = _t(4, 1, seed=8).float(), _t(4, 1, seed=9).float()
    got = ratio_norm_log_ratio(logp, old, mean, old_mean, std)
    for i in range(4):
        s = std[i].item()
        b = ((mean[i] - old_mean[i]) ** 2).mean().item() / (2 * s * s)
        assert got[i, 0].item() == pytest.approx((logp[i, 0].item() - old[i, 0].item() + b) * s, rel=1e-5)
    assert torch.equal(ratio_norm_log_ratio(old, old, old_mean, old_mean, std), torch.zeros(4, 1))


def test_ratio_norm_centres_the_ratio_of_sde_samples():
    """x' ~ N(μ_old, std²): the raw log-ratio averages −b (ratio below 1), the normalised one averages 0."""
    v, x = _t(1, 4, 8, 8, seed=10).float().repeat(512, 1, 1, 1), _t(1, 4, 8, 8, seed=11).float().repeat(512, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    x_next, old, old_mean, std = sde_step(v, x, 0.6, 0.5, 0.7, generator=gen)
    _, logp, mean, _ = sde_step(v + 1.0, x, 0.6, 0.5, 0.7, prev_sample=x_next)
    raw = (logp - old)[:, None]
    norm = ratio_norm_log_ratio(logp[:, None], old[:, None], mean, old_mean, std)
    assert raw.mean().item() < -3 * raw.std().item() / math.sqrt(512)
    assert abs(norm.mean().item()) < 3 * norm.std().item() / math.sqrt(512)


def verl_omni_step_scale(sigma, next_sigma):
    """verl-omni, verl_omni/trainer/diffusion/diffusion_algos.py, GRPOGuardLoss.compute_loss: the step's loss is
    ``torch.mean(per_elem_loss) / (sqrt_dt_mean**2)`` with ``sqrt_dt`` = sqrt(-dt) of the step, per sample."""
    sqrt_dt = torch.sqrt(sigma - next_sigma)
    sqrt_dt_mean = sqrt_dt.mean()
    return 1.0 / sqrt_dt_mean**2


def _shifted_schedule(steps, shift=3.0):
    """sigmas (S+1,) from 1 to 0 with the SD3 time shift (MixGRPO's sd3_time_shift, flow_grpo's schedules)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@pytest.mark.parametrize("windows", [([0, 1], [3, 4]), ([1, 2, 3], [6, 7, 8])])
def test_guard_step_weights_keep_verl_omnis_one_over_dt_across_windows(windows):
    sched = _shifted_schedule(10)
    mean_step = (sched[0] - sched[-1]).item() / 10
    got = {}
    for w in windows:
        idx = torch.tensor(w)
        sig, nxt = sched[idx].repeat(3, 1), sched[idx + 1].repeat(3, 1)  # (B, K), the window shared by the batch
        weights = guard_step_weights(sig, nxt, sched)
        want = torch.tensor([verl_omni_step_scale(sig[:, j], nxt[:, j]).item() for j in range(len(w))])
        # verl-omni's 1/|dt| times one constant of the whole schedule (its mean step), whatever the window
        torch.testing.assert_close(weights, (want * mean_step).float().expand(3, -1), rtol=1e-5, atol=0)
        got[tuple(w)] = (weights[0], want)
    (wa, ra), (wb, rb) = got.values()
    # the two windows keep verl-omni's relative weights (a mean over the trained steps would set both means to 1)
    assert (wa.mean() / wb.mean()).item() == pytest.approx((ra.mean() / rb.mean()).item(), rel=1e-5)
    assert abs(wa.mean().item() - wb.mean().item()) > 0.1


def test_guard_step_weights_are_one_on_a_uniform_schedule():
    sched = torch.linspace(1, 0, 9)
    idx = torch.tensor([2, 3, 4])
    assert torch.allclose(guard_step_weights(sched[idx][None], sched[idx + 1][None], sched), torch.ones(1, 3))


# ------------------------------------------------------------------------------------------------ GSPO
def test_gspo_sequence_ratio_and_clip():
    logp, old = _t(3, 5, seed=12).float() * 0.2, _t(3, 5, seed=13).float() * 0.2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0.5, 1, 1, 1, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, -1.0, 0.5])
    eps = 0.05
    loss, m = policy_loss(logp, old, adv, mask, epsilon_low=eps, epsilon_high=eps, loss_type="grpo",
                          importance_sampling_level="sequence")
    # GSPO eq. 7: s_i = exp(mean over the sequence's tokens of log π/π_old); per-sequence clipped surrogate
    want = []
    for i in range(3):
        s = math.exp(float(((logp[i] - old[i]) * mask[i]).sum() / mask[i].sum()))
        a = adv[i].item()
        want.append(-min(s * a, min(max(s, 1 - eps), 1 + eps) * a))
    assert loss.item() == pytest.approx(float(np.mean(want)), rel=1e-5)
    token, _ = policy_loss(logp, old, adv, mask, epsilon_low=eps, epsilon_high=eps, loss_type="grpo")
    assert token.item() != pytest.approx(loss.item(), rel=1e-3)
    same, _ = policy_loss(old, old, adv, mask, epsilon_low=eps, epsilon_high=eps, loss_type="grpo",
                          importance_sampling_level="sequence")
    assert same.item() == pytest.approx(-float((adv).mean()), rel=1e-6)


# ------------------------------------------------------------------------------------------------ MixGRPO
class MixGRPOWindow:
    """Tencent-Hunyuan/MixGRPO, fastvideo/utils/grpo_states.py, GRPOTrainingStates with sample_strategy
    "progressive" and prog_overlap (both released scripts): update_iteration and get_current_timesteps, as
    train_grpo_flux.py calls them once per training iteration (one rollout), get before update."""

    def __init__(self, iters_per_group, group_size, max_timesteps, prog_overlap_step, roll_back):
        self.iters_per_group, self.group_size, self.max_timesteps = iters_per_group, group_size, max_timesteps
        self.prog_overlap_step, self.roll_back = prog_overlap_step, roll_back
        self.cur_timestep = self.init_timestep = 0
        self.cur_iter_in_group = 0

    def get_current_timesteps(self):
        return list(range(self.cur_timestep, min(self.cur_timestep + self.group_size, self.max_timesteps)))

    def update_iteration(self):
        self.cur_iter_in_group += 1
        if self.cur_iter_in_group >= self.iters_per_group:
            self.cur_iter_in_group = 0
            self.cur_timestep += self.prog_overlap_step
        if self.cur_timestep > self.max_timesteps:
            if self.roll_back:
                self.cur_timestep = self.init_timestep
                self.cur_iter_in_group = 0
            else:
                self.cur_timestep = self.max_timesteps


def mixgrpo_windows(n, **kw):
    ref = MixGRPOWindow(**kw)
    out = []
    for _ in range(n):
        out.append(ref.get_current_timesteps())
        ref.update_iteration()
    return out


@pytest.mark.parametrize("hi, size, stride, interval", [(7, 2, 2, 3), (9, 4, 2, 2), (23, 4, 3, 5)])
def test_sliding_window_is_mixgrpos_per_rollout(hi, size, stride, interval):
    """stride does not divide hi: with --roll_back MixGRPO never reaches the empty window at hi, so the schedules
    are equal over several cycles; without it MixGRPO clamps the start to hi (an empty window: nothing trained
    from then on), where tandem's "shrink" keeps the last window."""
    n = 4 * interval * hi
    kw = dict(iters_per_group=interval, group_size=size, max_timesteps=hi, prog_overlap_step=stride)
    want = mixgrpo_windows(n, roll_back=True, **kw)
    got = [sliding_window(0, hi, size, stride, interval, rollout, "roll_back") for rollout in range(n)]
    assert got == want
    assert min(map(len, got)) < size  # the windows near hi shrink
    want = mixgrpo_windows(n, roll_back=False, **kw)
    got = [sliding_window(0, hi, size, stride, interval, rollout, "shrink") for rollout in range(n)]
    first_empty = want.index([])
    assert got[:first_empty] == want[:first_empty] and want[first_empty:] == [[]] * (n - first_empty)
    assert got[first_empty:] == [got[first_empty - 1]] * (n - first_empty)


def test_sliding_window_skips_mixgrpos_empty_window():
    """stride 1 (MixGRPO's scripts: 25 steps, max_timesteps 23): MixGRPO's start reaches hi itself, an empty window
    (nothing trained) for interval iterations, before rolling back, or for good without --roll_back; tandem skips
    that place and keeps the last non-empty window."""
    kw = dict(iters_per_group=3, group_size=4, max_timesteps=23, prog_overlap_step=1)
    cycle = 23 * 3
    rolled = mixgrpo_windows(3 * (cycle + 3), roll_back=True, **kw)
    assert rolled[cycle:cycle + 3] == [[]] * 3
    without_empty = [w for w in rolled if w]
    assert [sliding_window(0, 23, 4, 1, 3, r) for r in range(len(without_empty))] == without_empty
    clipped = mixgrpo_windows(cycle + 10, roll_back=False, **kw)
    assert clipped[cycle:] == [[]] * 10
    assert [sliding_window(0, 23, 4, 1, 3, r, "shrink") for r in range(cycle + 10)] == clipped[:cycle] + [[22]] * 10


def test_sliding_window_stay_and_lo():
    starts = [sliding_window(1, 7, 2, stride=2, interval=3, rollout=r, end="stay")[0] for r in range(12)]
    assert starts == [1, 1, 1, 3, 3, 3, 5, 5, 5, 5, 5, 5]
    assert [sliding_window(1, 7, 2, 2, 1, r)[0] for r in range(7)] == [1, 3, 5, 1, 3, 5, 1]
    cfg = DecoderConfig(num_steps=8, sde_window_size=2, sde_window_range=[1, 7], sde_window_schedule="sliding",
                        sde_window_stride=2, sde_window_shift_interval=3)
    rngs = [np.random.default_rng(s) for s in range(3)]  # the rollout seed plays no part: a function of the count
    assert {tuple(trained_step_indices(cfg, 8, r, rollout=4)) for r in rngs} == {(3, 4)}


def _dpm_scheduler(num_steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(num_steps)
    return sched


def test_dpm2m_equals_diffusers_dpm_solver_on_the_same_sigmas():
    sched = _dpm_scheduler(8)
    sigmas = sched.sigmas.float()
    x_ref = x = _t(2, 4, 8, 8, seed=14).float()
    history = None
    w = _t(2, 4, 8, 8, seed=15).float()
    for i, t in enumerate(sched.timesteps):
        v_ref, v = torch.tanh(x_ref + w) * (1 + i), torch.tanh(x + w) * (1 + i)  # a state-dependent "model"
        x_ref = sched.step(v_ref, t, x_ref, return_dict=False)[0]
        x, history = dpm2m_step(v, x, sigmas[i], sigmas[i + 1], history)
        assert torch.allclose(x, x_ref, atol=1e-5, rtol=1e-5), i


def test_first_order_dpm_step_is_the_euler_step():
    v, x = _t(2, 3, seed=16).float(), _t(2, 3, seed=17).float()
    first, _ = dpm2m_step(v, x, 0.7, 0.4, None)
    assert torch.allclose(first, ode_step(v, x, 0.7, 0.4), atol=1e-6)


# ------------------------------------------------------------------------------------------------ reward std
def flow_grpo_advantages(prompts, rewards, global_std):
    """flow_grpo (and DiffusionNFT), flow_grpo/stat_tracking.py, PerPromptStatTracker(global_std).update on a
    fresh tracker (flow_grpo clears it after every rollout)."""
    prompts = np.array(prompts)
    rewards = np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    stats = {}
    for prompt in np.unique(prompts):
        stats[prompt] = np.stack(list(rewards[prompts == prompt]))
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(stats[prompt], axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        else:
            std = np.std(stats[prompt], axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


@pytest.mark.parametrize("n", [4, 24])
def test_scale_rewards_against_flow_grpos_std(n):
    """scale_rewards group = flow_grpo's per-prompt advantages × √((n − 1)/n) (ddof 1 against numpy's 0);
    scale_rewards batch = its global_std advantages × √((N − 1)/N). Rewards spread wide enough for eps to vanish."""
    from tandem.rl.advantages import compute_advantages

    rewards = np.random.default_rng(n).normal(size=3 * n) * 100
    group_ids = np.repeat(np.arange(3), n)
    prompts = [f"prompt {g}" for g in group_ids]
    for scale, global_std, size in (("group", False, n), ("batch", True, 3 * n)):
        ours = compute_advantages({"r": rewards}, {"r": 1.0}, group_ids, scale_rewards=scale).advantages
        theirs = flow_grpo_advantages(prompts, rewards, global_std)
        np.testing.assert_allclose(ours, theirs * math.sqrt((size - 1) / size), rtol=1e-5)
    assert math.sqrt(3 / 4) == pytest.approx(0.866, abs=1e-3)

