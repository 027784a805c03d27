"""The objectives and options on the tiny GLM-Image models (real classes, CPU): the sliding SDE window (counted in
the decoder stage's rollouts) and DPM-Solver++(2M) rollouts against MixGRPO-Flash's sampler (first ratio 1, only
in-window steps trained), GRPO-Guard's first ratio and step weights (also with recomputed old log-probs, against
verl-omni's ratio), DiffusionNFT's prepare + loss against its closed form, its fresh draws and old policy, GSPO on
the AR policy."""

import numpy as np
import pytest
import torch

from tandem.policies.glm_image import load_pipeline
from tandem.policies.ode_solvers.dpm2m import dpm2m_step
from tandem.rl.config import DecoderConfig, JobConfig, apply_stage_defaults
from tandem.rl.nft import nft_loss, optimality_probability
from tandem.rl.objectives import OBJECTIVES
from tandem.rl.session import build_policy

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tiny pipelines and jobs
PROMPTS, META = ["a red apple", 'a sign "OPEN"'], [{}, {}]


def decoder_policy(path, objective="clipped_surrogate", grpo=(), **decoder):
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.model.device = str(path), "cpu"
    apply_stage_defaults(cfg, "decoder")
    cfg.decoder = DecoderConfig(num_steps=6, **decoder)
    cfg.grpo.mini_batch_size, cfg.grpo.objective = 4, objective
    for key, value in dict(grpo).items():
        setattr(cfg.grpo, key, value)
    return build_policy("decoder", cfg, load_pipeline(str(path), device="cpu")), cfg


def with_advantages(batch):
    batch.advantages = torch.linspace(-1.5, 1.5, len(batch))
    return batch


@pytest.mark.parametrize("objective", ["clipped_surrogate", "grpo_guard"])
def test_sliding_window_dpm_rollout_trains_the_window_only_and_first_ratio_is_one(tiny_model_path, objective):
    policy, cfg = decoder_policy(tiny_model_path, objective, guidance_scale=1.5, sde_window_size=2,
                                 sde_window_range=[0, 5], sde_window_schedule="sliding", sde_window_stride=1,
                                 sde_window_shift_interval=4, ode_solver="dpm2m")
    policy.begin_rollout(9, 30)  # the 10th rollout batch: start = 0 + 1 * floor(9 / 4) = 2, whatever the steps
    batch = with_advantages(policy.rollout(PROMPTS, META, group_size=4, seed=3))
    _, sigmas = policy.schedule()
    assert torch.equal(batch.extras["sigmas"][0], sigmas[2:4]) and len(policy.unit_chunks(batch)) == 2
    obj = OBJECTIVES.get(objective)()
    batch = obj.prepare(policy, batch, cfg.grpo)
    mean_step = (sigmas[0] - sigmas[-1]).item() / (len(sigmas) - 1)
    for chunk in policy.unit_chunks(batch):
        _, metrics = obj.loss(policy, batch.select(torch.arange(4)), chunk, cfg.grpo)
        assert abs(metrics["ratio/max"] - 1) < 1e-5 and abs(metrics["ratio/min"] - 1) < 1e-5
        if objective == "grpo_guard":  # verl-omni's 1/|dt| of the step, times the schedule's mean step
            k = 2 + chunk.start
            want = mean_step / (sigmas[k] - sigmas[k + 1]).item()
            assert metrics["guard/step_weight"] == pytest.approx(want, rel=1e-5)


class RecordingHooks:
    """Phase 6 of the trainer (``rl.session.Hooks``' two callbacks), keeping each step's metrics."""

    def __init__(self):
        self.steps = []

    def after_step(self, trainer, metrics):
        self.steps.append(metrics)

    def after_rollout(self, trainer):
        pass


def test_sliding_window_counts_the_decoder_stages_rollouts(tiny_model_path):
    """A joint job's decoder trainer, 29 optimizer steps in (20 of them AR, 7 rollouts of which 2 decoder ones), two
    optimizer steps per rollout: the window moves once per decoder rollout (MixGRPO's τ counts iterations, one
    rollout each), not per optimizer step nor with the AR stage's."""
    from accelerate import Accelerator

    from tandem.core.types import PromptRecord
    from tandem.rewards.client import RewardClient
    from tandem.rewards.config import RewardEntry
    from tandem.rl.run_state import RunState
    from tandem.rl.trainer import StageTrainer

    policy, cfg = decoder_policy(tiny_model_path, guidance_scale=1.0, sde_window_size=1, sde_window_range=[0, 5],
                                 sde_window_schedule="sliding", sde_window_stride=1, sde_window_shift_interval=1)
    cfg.grpo.num_generations, cfg.grpo.prompts_per_step, cfg.grpo.mini_batch_size = 2, 2, 2
    cfg.rewards, cfg.reward_host.backend = [RewardEntry(name="brightness")], "local"
    state = RunState(step=29, rollouts=7, stage_steps={"ar": 20, "decoder": 9}, stage_rollouts={"ar": 5, "decoder": 2})
    _, sigmas = policy.schedule()
    with RewardClient(cfg.rewards, cfg.reward_host) as rewards:
        trainer = StageTrainer("decoder", cfg, policy, rewards, None, Accelerator(cpu=True), state,
                               [PromptRecord(p, m) for p, m in zip(PROMPTS, META)], num_steps=100)
        hooks = RecordingHooks()
        for decoder_rollout in (2, 3):
            trainer.train_rollout(stop_at=100, hooks=hooks)
            assert state.stage_rollouts == {"ar": 5, "decoder": decoder_rollout + 1}
        assert state.stage_steps == {"ar": 20, "decoder": 13} and state.step == 33 and len(hooks.steps) == 4
        assert trainer.rollout_and_score().subs[0].extras["sigmas"][0, 0] == sigmas[4]  # the 5th decoder rollout
        assert policy.rollout_index == 4 and policy.stage_step == 13


def test_run_state_counts_each_stage_and_a_final_checkpoint_finishes_its_rollout():
    from tandem.rl.run_state import RunState

    state = RunState()
    for stage, steps in (("ar", 3), ("decoder", 2), ("ar", 1)):
        for _ in range(steps):
            state.count_step(stage)
        state.count_rollout(stage)
    state.count_step("decoder")  # the job's last step, inside a decoder rollout
    assert state.stage_counts("ar") == (2, 4) and state.stage_counts("decoder") == (1, 3)
    saved = dict(state.to_dict(), rollouts=state.rollouts + 1)  # rl/session.py: its rollout counts as done
    resumed = RunState()
    resumed.load(saved)
    assert resumed.stage_counts("ar") == (2, 4) and resumed.stage_counts("decoder") == (2, 3)
    again = RunState()
    again.load(state.to_dict())  # a checkpoint between rollouts
    assert again.stage_rollouts == state.stage_rollouts and again.stage_steps == state.stage_steps


def verl_omni_guard_ratio(log_prob, old_log_prob, prev_sample_mean, old_prev_sample_mean, step_std):
    """verl-omni, verl_omni/trainer/diffusion/diffusion_algos.py, GRPOGuardLoss.compute_loss (scale = sqrt_dt·σ_t,
    the step std): ratio = exp((log_prob − old_log_prob + mean((μ − μ_old)²)/(2·scale²))·scale). Its old log-probs
    and old means come from one forward (ray_diffusion_trainer.py, _compute_old_log_prob: old_log_probs and
    old_prev_sample_mean of infer_actor_batch)."""
    scale = step_std.mean()
    mean_diff_sq = (prev_sample_mean - old_prev_sample_mean).pow(2).mean(dim=tuple(range(1, prev_sample_mean.ndim)))
    return torch.exp((log_prob - old_log_prob + mean_diff_sq / (2 * scale**2)) * scale)


def test_guard_with_recomputed_old_log_probs_starts_on_policy(tiny_model_path):
    """grpo.old_log_probs recompute: the recompute forward gives the old means too, so the first r̃ is exactly 1
    even where the training forward differs from the rollout's (here: weights nudged after the rollout)."""
    from accelerate import Accelerator

    from tandem.core.types import PromptRecord
    from tandem.rl.run_state import RunState
    from tandem.rl.trainer import ScoredRollout, StageTrainer

    policy, cfg = decoder_policy(tiny_model_path, "grpo_guard", guidance_scale=1.5, sde_window_size=2,
                                 sde_window_range=[1, 4])
    cfg.grpo.old_log_probs = "recompute"
    batch = with_advantages(policy.rollout(PROMPTS, META, group_size=2, seed=4))
    rollout_means = batch.extras["old_means"].clone()
    with torch.no_grad():  # a training forward that rounds differently from the rollout's
        for i, p in enumerate(policy.trainable_parameters()):
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    trainer = StageTrainer("decoder", cfg, policy, None, None, Accelerator(cpu=True), RunState(),
                           [PromptRecord(p, m) for p, m in zip(PROMPTS, META)], num_steps=1)
    assert trainer.recompute
    trainer.recompute_old_log_probs(ScoredRollout([batch], None, None, {}))
    assert not torch.allclose(batch.extras["old_means"], rollout_means)  # the old means were recomputed
    obj = OBJECTIVES.get("grpo_guard")()
    for chunk in policy.unit_chunks(batch):
        _, metrics = obj.loss(policy, batch, chunk, cfg.grpo)
        assert abs(metrics["ratio/max"] - 1) < 1e-6 and abs(metrics["ratio/min"] - 1) < 1e-6
        with torch.no_grad():
            logp, mean, std = policy.step_moments(batch, chunk.start)
        want = verl_omni_guard_ratio(logp, batch.old_log_probs[:, chunk.start], mean,
                                     batch.extras["old_means"][:, chunk.start], std)
        torch.testing.assert_close(want, torch.ones_like(want), atol=1e-6, rtol=0)


def mixgrpo_flash_dpm_update(x, sigmas, i, model_outputs, lower_order_nums):
    """Tencent-Hunyuan/MixGRPO, fastvideo/utils/sampling_utils.py, dpm_step's ODE update with dpm_algorithm_type
    "dpmsolver++", solver order 2, "midpoint" (dpm_solver_first_order_update / multistep_dpm_solver_second_order_
    update, sde_solver=False): model_outputs are the data predictions x̂₀ of the previous and this step."""
    alpha = lambda s: 1 - s  # _sigma_to_alpha_sigma_t
    lam = lambda s: torch.log(alpha(s)) - torch.log(s)
    sigma_t, sigma_s0 = sigmas[i + 1], sigmas[i]
    h = lam(sigma_t) - lam(sigma_s0)
    m0 = model_outputs[-1]
    if lower_order_nums < 1 or i == len(sigmas) - 2:  # first order, and lower_order_final on the last step
        return (sigma_t / sigma_s0) * x - (alpha(sigma_t) * (torch.exp(-h) - 1.0)) * m0
    h_0 = lam(sigma_s0) - lam(sigmas[i - 1])
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - model_outputs[-2])
    return ((sigma_t / sigma_s0) * x - (alpha(sigma_t) * (torch.exp(-h) - 1.0)) * d0
            - 0.5 * (alpha(sigma_t) * (torch.exp(-h) - 1.0)) * d1)


def noise_free_dpm2m_rollout(tiny_model_path, window_start: int):
    """A dpm2m rollout at noise 0 with a one-step window at ``window_start``, and what replaying it needs: the policy,
    the rollout, its timesteps and sigmas, its conditions and its starting noise."""
    policy, _ = decoder_policy(tiny_model_path, guidance_scale=1.0, noise_level=0.0, sde_window_size=1,
                               sde_window_range=[window_start, window_start + 1], ode_solver="dpm2m")
    batch = policy.rollout(PROMPTS[:1], META[:1], group_size=2, seed=5)
    timesteps, sigmas = policy.schedule()
    x = policy.adapter.initial_noise(batch.extras["noise_seeds"].tolist())
    return policy, batch, timesteps, sigmas, batch.extras["cond"], x


def test_mixgrpo_flash_rollout_keeps_the_solver_history_through_the_window(tiny_model_path):
    """noise 0 everywhere, the window at step 1: tandem's rollout is MixGRPO-Flash's "post" sampling (run_sample_step
    with dpm_apply_strategy "post", on the same sigmas; Flash also re-spaces the steps after the window,
    dpm_post_compress_ratio, not done here): steps up to the window's are flow_grpo_steps (Euler; tandem's dpm2m
    step 0 has no history, so it is Euler too) whose x̂₀ go into the DPMState, every later step a
    DPM-Solver++(2M) step on that history — the first one second order with the window step's x̂₀."""
    policy, batch, timesteps, sigmas, cond, x = noise_free_dpm2m_rollout(tiny_model_path, window_start=1)
    model_outputs, lower_order_nums = [None, None], 0  # DPMState(order=2)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = policy.adapter.velocity(policy.model, x, t, cond, 1.0)
            model_outputs = [model_outputs[1], x - sigmas[i] * v]  # dpm_state.update(convert_model_output(...))
            if i <= 1:  # i <= last_false_index: flow_grpo_step(determistic=True) = Euler
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            else:
                x = mixgrpo_flash_dpm_update(x, sigmas, i, model_outputs, lower_order_nums)
            lower_order_nums = min(lower_order_nums + 1, 2)  # dpm_state.update_lower_order()
    assert torch.allclose(batch.extras["x0"], x, atol=1e-5)


def test_mixed_rollout_ode_steps_are_dpm_solver_steps(tiny_model_path):
    """noise 0 everywhere: the rollout's last image is the DPM-Solver++(2M) integration, its window step Euler,
    the solver's history going on through it (tandem also runs dpm2m before the window, where MixGRPO-Flash
    takes Euler steps)."""
    policy, batch, timesteps, sigmas, cond, x = noise_free_dpm2m_rollout(tiny_model_path, window_start=2)
    history = None
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = policy.adapter.velocity(policy.model, x, t, cond, 1.0)
            if i == 2:
                x, history = x + (sigmas[i + 1] - sigmas[i]) * v, (x - sigmas[i] * v, sigmas[i])
            else:
                x, history = dpm2m_step(v, x, sigmas[i], sigmas[i + 1], history)
    assert torch.allclose(batch.extras["x0"], x, atol=1e-5)


def test_nft_prepare_and_loss_match_the_closed_form(tiny_model_path):
    policy, cfg = decoder_policy(tiny_model_path, "diffusion_nft", guidance_scale=1.0, noise_level=0.0,
                                 sde_window_size=1, sde_window_range=[0, 1])
    cfg.grpo.nft_num_timesteps, cfg.grpo.nft_beta, cfg.grpo.adv_clip_max = 3, 0.5, 1.0
    obj = OBJECTIVES.get("diffusion_nft")()
    batch = with_advantages(obj.prepare(policy, policy.rollout(PROMPTS, META, group_size=4, seed=2), cfg.grpo))
    e = batch.extras
    assert batch.old_log_probs.shape == batch.mask.shape == (8, 3) and len(policy.unit_chunks(batch)) == 3
    timesteps, sigmas = policy.schedule()
    for j in range(3):  # x_σ on the forward process of the rollout's clean sample, target ε − x₀
        s = sigmas[(timesteps[:, None] == e["nft_t"][:, j]).float().argmax(0)].view(-1, 1, 1, 1)
        eps = e["nft_target"][:, j] + e["x0"]
        assert torch.allclose(e["nft_xt"][:, j], (1 - s) * e["x0"] + s * eps, atol=1e-5)
    mb = batch.select(torch.arange(4))
    loss, metrics = obj.loss(policy, mb, slice(1, 2), cfg.grpo)
    v = policy.adapter.velocity(policy.model, mb.extras["nft_xt"][:, 1], mb.extras["nft_t"][:, 1], mb.extras["cond"], 1.0)
    assert torch.allclose(v, mb.extras["nft_v_old"][:, 1], atol=1e-5)  # the rollout weights are the old policy
    want = nft_loss(v, v, mb.extras["nft_target"][:, 1], optimality_probability(mb.advantages, 1.0), 0.5).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_nft_objective_with_the_reference_options_is_the_reference_loss(tiny_model_path):
    """nft_adaptive_weight + nft_scale_policy_loss + grpo.beta: the objective's loss of one unit is NVlabs
    DiffusionNFT's (transcribed in tests/rl/test_objective_formulas.py) on the same x₀, noise, σ and velocities."""
    from tests.rl.test_objective_formulas import diffusionnft_reference_loss

    grpo = {"nft_adaptive_weight": True, "nft_scale_policy_loss": True, "beta": 0.3, "nft_beta": 0.5,
            "adv_clip_max": 1.0, "nft_num_timesteps": 2}
    policy, cfg = decoder_policy(tiny_model_path, "diffusion_nft", grpo, guidance_scale=1.0, noise_level=0.0,
                                 sde_window_size=1, sde_window_range=[0, 1])
    obj = OBJECTIVES.get("diffusion_nft")()
    batch = with_advantages(obj.prepare(policy, policy.rollout(PROMPTS, META, group_size=2, seed=8), cfg.grpo))
    with torch.no_grad():  # an update away from the old policy
        for i, p in enumerate(policy.trainable_parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    loss, _ = obj.loss(policy, batch, slice(1, 2), cfg.grpo)
    e = batch.extras
    x0, t = e["x0"], e["nft_sigma"][:, 1]
    noise = e["nft_target"][:, 1] + x0
    v = policy.adapter.velocity(policy.model, e["nft_xt"][:, 1], e["nft_t"][:, 1], e["cond"], 1.0)
    v_ref = policy.velocity(batch, e["nft_xt"][:, 1], e["nft_t"][:, 1], grad=False, reference=True)
    want = diffusionnft_reference_loss(x0, noise, t, v, e["nft_v_old"][:, 1], v_ref, batch.advantages, 0.5, 1.0, 0.3)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_nft_fresh_draws_per_update_epoch(tiny_model_path):
    """grpo.nft_fresh_noise: one set of timesteps and noise per update epoch, the first set the one-draw set, each
    set's v_old by the weights that sampled; the loss of epoch e reads set e."""
    policy, cfg = decoder_policy(tiny_model_path, "diffusion_nft", guidance_scale=1.0, noise_level=0.0,
                                 sde_window_size=1, sde_window_range=[0, 1])
    cfg.grpo.nft_num_timesteps, cfg.grpo.adv_clip_max, cfg.grpo.num_iterations = 2, 1.0, 3
    obj = OBJECTIVES.get("diffusion_nft")()
    rollout = with_advantages(policy.rollout(PROMPTS, META, group_size=2, seed=6))
    once = obj.prepare(policy, rollout, cfg.grpo).extras
    cfg.grpo.nft_fresh_noise = True
    batch = obj.prepare(policy, rollout, cfg.grpo)
    e = batch.extras
    assert e["nft_t"].shape == (4, 6) and batch.mask.shape == (4, 2) and len(policy.unit_chunks(batch)) == 2
    assert torch.equal(e["nft_t"][:, :2], once["nft_t"]) and torch.equal(e["nft_xt"][:, :2], once["nft_xt"])
    assert not torch.equal(e["nft_xt"][:, 2:4], e["nft_xt"][:, :2])
    for epoch in (0, 2):
        policy.inner_epoch = epoch
        loss, _ = obj.loss(policy, batch, slice(1, 2), cfg.grpo)
        j = 2 * epoch + 1
        v = policy.adapter.velocity(policy.model, e["nft_xt"][:, j], e["nft_t"][:, j], e["cond"], 1.0)
        assert torch.allclose(v, e["nft_v_old"][:, j], atol=1e-5)
        want = nft_loss(v, v, e["nft_target"][:, j], optimality_probability(batch.advantages, 1.0), 1.0).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    policy.inner_epoch = 0


def test_nft_old_policy_samples_the_rollout_and_gives_v_old(tiny_model_path, tmp_path):
    """grpo.nft_old_decay_type 1: before each rollout batch old ← d·old + (1 − d)·θ, d = min(0.001·s, 0.5); the
    rollout and v_old come from the old weights, the live weights stay θ; a checkpoint keeps the old weights."""
    from accelerate import Accelerator

    from tandem.core.types import PromptRecord
    from tandem.rl.checkpoint import read_state, restore, save_checkpoint
    from tandem.rl.run_dir import RunDir
    from tandem.rl.run_state import RunState
    from tandem.rl.trainer import StageTrainer

    def nft_policy():
        torch.manual_seed(0)
        policy, cfg = decoder_policy(tiny_model_path, "diffusion_nft", {"nft_old_decay_type": 1, "adv_clip_max": 1.0},
                                     guidance_scale=1.0, noise_level=0.0, sde_window_size=1, sde_window_range=[0, 1])
        cfg.output_dir = str(tmp_path)
        return policy, cfg

    policy, cfg = nft_policy()
    params = policy.trainable_parameters()
    policy.begin_rollout(0, 0)
    theta0 = [p.detach().clone() for p in params]
    assert all(torch.equal(o, t) for o, t in zip(policy.old.shadow, theta0))  # d(0) = 0: old starts as θ
    with torch.no_grad():  # the first rollout's updates
        for i, p in enumerate(params):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    theta1 = [p.detach().clone() for p in params]
    policy.begin_rollout(1, 100)  # d = min(0.001 * 100, 0.5) = 0.1
    old = [0.1 * a + 0.9 * b for a, b in zip(theta0, theta1)]  # DiffusionNFT: tgt * decay + src * (1 - decay)
    for o, want in zip(policy.old.shadow, old):
        torch.testing.assert_close(o, want)
    batch = policy.rollout(PROMPTS[:1], META[:1], group_size=2, seed=7)
    assert all(torch.equal(p.detach(), t) for p, t in zip(params, theta1))  # the live weights are θ again
    cfg.grpo.nft_num_timesteps = 1
    e = OBJECTIVES.get("diffusion_nft")().prepare(policy, batch, cfg.grpo).extras
    with torch.no_grad():
        for p, o in zip(params, old):
            p.copy_(o)
    plain = policy.old
    policy.old = None  # the same model, carrying the old weights
    assert torch.allclose(policy.rollout(PROMPTS[:1], META[:1], group_size=2, seed=7).extras["x0"], batch.extras["x0"],
                          atol=1e-6)
    v = policy.adapter.velocity(policy.model, e["nft_xt"][:, 0], e["nft_t"][:, 0], e["cond"], 1.0)
    assert torch.allclose(v, e["nft_v_old"][:, 0], atol=1e-6)
    policy.old = plain

    def trainer(policy):
        return StageTrainer("decoder", cfg, policy, None, None, Accelerator(cpu=True), RunState(),
                            [PromptRecord(p, m) for p, m in zip(PROMPTS, META)], num_steps=4)

    RunDir(str(tmp_path)).create(cfg)
    folder = save_checkpoint(tmp_path / "checkpoints", 1, {"decoder": trainer(policy)}, cfg, {"run_state": {}})
    assert (folder / "decoder.extra_state.safetensors").is_file()
    resumed, _ = nft_policy()
    restore(folder, {"decoder": trainer(resumed)}, read_state(folder, cfg))
    assert all(torch.equal(a, b) for a, b in zip(resumed.old.shadow, policy.old.shadow))


def test_gspo_on_the_ar_policy_first_ratio_is_one(tiny_path):
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.model.device = tiny_path, "cpu"
    apply_stage_defaults(cfg, "ar")
    cfg.grpo.importance_sampling_level = "sequence"
    policy = build_policy("ar", cfg, load_pipeline(tiny_path, device="cpu"))
    batch = with_advantages(policy.rollout(PROMPTS, META, group_size=2, seed=1))
    obj = OBJECTIVES.get("clipped_surrogate")()
    loss, metrics = obj.loss(policy, batch, policy.unit_chunks(batch)[0], cfg.grpo)
    assert abs(metrics["ratio/max"] - 1) < 1e-5 and abs(metrics["ratio/min"] - 1) < 1e-5
    assert loss.item() == pytest.approx(-batch.advantages.mean().item(), abs=1e-5)


@pytest.mark.slow  # short end-to-end runs
@pytest.mark.parametrize("stage, overrides", [
    ("decoder", ["grpo.objective=grpo_guard", "decoder.sde_window_schedule=sliding",
                 "decoder.sde_window_shift_interval=1", "decoder.ode_solver=dpm2m"]),
    ("ar", ["grpo.importance_sampling_level=sequence"]),
], ids=["guard-mixgrpo", "gspo"])
def test_options_run_from_the_demo_configs(tiny_model_path, tmp_path, stage, overrides):
    from tandem.rl.config import load_config
    from tandem.rl.session import train
    import json

    cfg = load_config(f"configs/demo/{stage}.yaml", [f"output_dir={tmp_path / stage}", f"model.path={tiny_model_path}",
                                                      "max_steps=4", "logging.sample_every=0", "logging.progress=false",
                                                      "reward_host.backend=local", *overrides], stage=stage)
    rows = [json.loads(line) for line in (train(cfg, stage) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in rows if r["time/rollout_s"] > 0)  # first step on-policy
    assert all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow  # three short jobs
def test_nft_reference_recipe_runs_and_resumes_exactly(tiny_model_path, tmp_path):
    """configs/demo/decoder_nft.yaml with every reference option (old policy decay_type 1, adaptive weight, ×Z,
    fresh draws per epoch, two epochs): a run stopped after its first rollout and resumed logs what the
    uninterrupted run logs — the old policy's weights come back from the checkpoint."""
    from tandem.rl.config import load_config
    from tandem.rl.session import train
    import json

    def run(name, steps, *extra):
        cfg = load_config("configs/demo/decoder_nft.yaml", [
            f"output_dir={tmp_path / name}", f"model.path={tiny_model_path}", f"max_steps={steps}",
            "logging.sample_every=0", "logging.progress=false", "reward_host.backend=local", "grpo.prompts_per_step=1",
            "grpo.mini_batch_size=4", "grpo.num_iterations=2", "grpo.nft_old_decay_type=1", "grpo.nft_adaptive_weight=true",
            "grpo.nft_scale_policy_loss=true", "grpo.nft_fresh_noise=true", "grpo.beta=0.01", "decoder.ema_decay=0",
            *extra], stage="decoder")
        return [json.loads(line) for line in (train(cfg, "decoder") / "metrics.jsonl").read_text().splitlines()]

    whole = run("whole", 4)
    run("parts", 2)
    parts = run("parts", 4, "resume=auto")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts):
        assert (a["loss"], a["nft/old_deviation"], a["reward/mean"]) == (b["loss"], b["nft/old_deviation"], b["reward/mean"])
    assert whole[2]["nft/old_deviation"] > 0  # the second rollout's first step: v_θ is not the old policy's

