"""Flow policy over the tiny GlmImageTransformer2DModel: on-policy ratio, KL at init, SDE window rules."""

import numpy as np
import pytest
import torch

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.policies.flow import trained_step_indices
from tandem.rl.session import build_policy
from tandem.policies.glm_image import load_pipeline
from tandem.rl.config import DecoderConfig, JobConfig, apply_stage_defaults

pytestmark = pytest.mark.slow  # tiny pipelines


def make_cfg(path, **decoder):
    cfg = JobConfig(output_dir="unused")
    cfg.model.path = str(path)
    apply_stage_defaults(cfg, "decoder")
    cfg.decoder = DecoderConfig(num_steps=6, **decoder)
    cfg.grpo.mini_batch_size = 4
    return cfg


def first_iteration(policy, batch):
    """(ratio - 1, kl) of every trained step of every sample on the first on-policy pass."""
    diffs, kls = [], []
    for index in (torch.arange(0, 4), torch.arange(4, 8)):
        mb = batch.select(index)
        for chunk in policy.unit_chunks(mb):
            out = policy.log_probs(mb, chunk, with_kl=True)
            diffs.append((out.log_probs - mb.old_log_probs[:, chunk]).exp() - 1)
            kls.append(out.kl)
    return torch.cat(diffs), torch.cat(kls)


@pytest.mark.parametrize(
    "decoder, lora",
    [
        (dict(guidance_scale=1.5, sde_window_size=2, sde_window_range=[0, 5]), False),
        (dict(guidance_scale=1.0, sde_window_size=2, sde_window_range=[1, 4]), False),
        (dict(guidance_scale=1.5, sde_window_size=0, timestep_fraction=0.6, sde_type="cps", noise_level=0.5), True),
        (dict(guidance_scale=1.5, sde_window_size=2, sde_window_range=[0, 5], cfg_batch=True), False),
    ],
    ids=["cfg-window", "nocfg-window", "cfg-fraction-cps-lora", "cfg-batch-window"],
)
def test_first_ratio_is_one_and_kl_is_zero(tiny_model_path, decoder, lora):
    cfg = make_cfg(tiny_model_path, **decoder)
    cfg.grpo.beta = 0.01
    cfg.optim.lora.enabled = lora
    policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
    batch = policy.rollout(["a red apple", 'a sign "OPEN"'], [{}, {}], group_size=4, seed=1)
    assert batch.images.shape == (8, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.old_log_probs.shape == batch.mask.shape == (8, len(policy.unit_chunks(batch)))
    ratio_minus_one, kl = first_iteration(policy, batch)
    assert ratio_minus_one.abs().max().item() < 1e-5
    assert kl.abs().max().item() == 0.0
    # the log-probs are real densities that the parameters move
    chunk = policy.unit_chunks(batch)[0]
    out = policy.log_probs(batch.select(torch.arange(4)), chunk, with_kl=False)
    out.log_probs.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_noise_zero_rollout_is_the_ode_render(tiny_model_path):
    """With noise_level 0 every step is the Euler step, so the rollout equals the deterministic render."""
    from tandem.policies.glm_image_family import render_tokens

    cfg = make_cfg(tiny_model_path, noise_level=0.0, guidance_scale=1.5)
    cfg.grpo.mini_batch_size = 8
    policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
    batch = policy.rollout(["a cat"], [{}], group_size=2, seed=4)
    seeds = batch.extras["noise_seeds"].tolist()
    expected = render_tokens(policy.adapter, batch.extras["cond"]["full_tokens"], batch.prompts, 6, 1.5, seeds)
    assert np.array_equal(batch.images, expected)


def test_same_noise_in_group(tiny_model_path):
    """With noise 0, copies that share their initial noise give the same image (up to batch-row float
    rounding, <= 1/255); without sharing they differ."""
    images = {}
    for same in (True, False):
        cfg = make_cfg(tiny_model_path, same_noise_in_group=same, noise_level=0.0)
        policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
        batch = policy.rollout(["a cat"], [{}], group_size=2, seed=0)
        images[same] = np.abs(batch.images[0].astype(int) - batch.images[1].astype(int))
    assert images[True].max() <= 1
    assert images[False].mean() > 5


def test_a_registered_ode_solver_runs_the_rollout_and_sees_every_step(tiny_model_path):
    """A solver registered from outside (as a new file under policies/ode_solvers/ would) is a valid
    ``decoder.ode_solver`` and steps the whole rollout: every step, the SDE window's included (its state threads
    through), its samples outside the window are the rollout's."""
    from tandem.policies.ode_solvers import ODE_SOLVERS, ODESolver
    from tandem.policies.sde import ode_step
    from tandem.rl.config import RewardEntry, validate

    assert ODE_SOLVERS.names() == ["dpm2m", "euler"]  # found by the package's own module discovery
    calls = []

    @ODE_SOLVERS.register("test_counting_euler")
    class CountingEuler(ODESolver):
        def step(self, velocity, x, sigma, sigma_next, state):
            calls.append((float(sigma), state))
            return ode_step(velocity, x, sigma, sigma_next), (state or 0) + 1

    try:
        images = {}
        for solver in ("euler", "test_counting_euler"):
            cfg = make_cfg(tiny_model_path, ode_solver=solver, sde_window_size=2,
                           sde_window_range=[1, 4])
            cfg.rewards = [RewardEntry(name="brightness")]
            validate(cfg, "decoder")
            policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
            images[solver] = policy.rollout(["a cat"], [{}], group_size=2, seed=3).extras["x0"]
        sigmas, states = zip(*calls)
        assert list(sigmas) == sorted(sigmas, reverse=True) and list(states) == [None, 1, 2, 3, 4, 5]
        assert torch.equal(images["euler"], images["test_counting_euler"])
    finally:
        ODE_SOLVERS.unregister("test_counting_euler")
    cfg.decoder.ode_solver = "test_counting_euler"
    with pytest.raises(ValueError, match="decoder.ode_solver.*allowed: dpm2m, euler"):
        validate(cfg, "decoder")


def test_window_never_trains_the_last_step():
    rng = np.random.default_rng(0)
    window = DecoderConfig(num_steps=6, sde_window_size=2, sde_window_range=[0, 5])
    seen = {i for _ in range(50) for i in trained_step_indices(window, 6, rng)}
    assert seen == {0, 1, 2, 3, 4}
    fraction = DecoderConfig(num_steps=6, sde_window_size=0, timestep_fraction=1.0)
    assert trained_step_indices(fraction, 6, rng) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "override, key",
    [
        ("decoder.sde_window_range=[3,12]", "decoder.sde_window_range"),
        ("grpo.num_generations=1", "grpo.num_generations"),
        ("rewards=[{name: no_such_reward}]", "no_such_reward"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tmp_path, override, key):
    out = tmp_path / "run"
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={out}",
                      "reward_host.backend=local", override)
    assert_user_mistake(proc, key)
    assert not out.exists()


def test_reference_images_condition_the_decoder(tiny_model_path, tmp_path):
    """condition_source=reference: prior tokens are the AR model's VQ tokens of metadata['reference']."""
    from PIL import Image

    from tandem.core.data import load_prompts

    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (20, 40, 200))):
        Image.new("RGB", (80, 80), colour).save(tmp_path / name)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red square", "reference": "red.png"}\n'
                                      '{"prompt": "a blue square", "reference": "blue.png"}\n')
    records = load_prompts(str(tmp_path / "p.jsonl"), image_size=(64, 64))
    assert records[0].metadata["reference"].shape == (64, 64, 3)
    cfg = make_cfg(tiny_model_path, condition_source="reference")
    policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
    tokens = policy.adapter.full_tokens([r.prompt for r in records], [r.metadata for r in records], seed=0)
    grids = policy.adapter.grids
    assert tokens.shape == (2, grids.num_full) and int(tokens.max()) < 128
    assert not torch.equal(tokens[0], tokens[1])  # different images, different VQ tokens
    batch = policy.rollout([r.prompt for r in records], [r.metadata for r in records], group_size=4, seed=0)
    assert np.array_equal(batch.metadata[0]["reference"], records[0].metadata["reference"])  # kept for lpips
    assert torch.equal(batch.extras["cond"]["full_tokens"][:4], tokens[0].expand(4, -1))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_blocks_match_eager_policy(tiny_model_path, lora):
    """``decoder.compile`` (regional torch.compile, inductor on CPU): the same rollout as the eager policy up to
    fusion rounding, first ratio 1, KL 0, and gradients flow through the compiled blocks."""
    prompts, meta = ["a red apple", 'a sign "OPEN"'], [{}, {}]
    batches = []
    for compile_blocks in (False, True):
        cfg = make_cfg(tiny_model_path, guidance_scale=1.5, sde_window_size=2, sde_window_range=[0, 4],
                       compile=compile_blocks)
        cfg.grpo.beta = 0.01
        cfg.optim.lora.enabled = lora
        policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
        batches.append(policy.rollout(prompts, meta, group_size=4, seed=2))
    eager, compiled = batches
    torch.testing.assert_close(compiled.old_log_probs, eager.old_log_probs, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(compiled.extras["next_latents"], eager.extras["next_latents"], atol=1e-4, rtol=0)
    ratio_minus_one, kl = first_iteration(policy, compiled)
    assert ratio_minus_one.abs().max().item() < 1e-4
    assert kl.abs().max().item() < 1e-10  # the full-FT reference is an uncompiled copy: rounding only
    out = policy.log_probs(compiled.select(torch.arange(4)), policy.unit_chunks(compiled)[0], with_kl=False)
    out.log_probs.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_merged_lora_rollout_is_the_adapter_rollout(tiny_model_path):
    """A LoRA rollout with the adapters merged (``merged_rollout``: on where ``decoder.compile`` already makes the
    trainer recompute the old log-probs) samples what the adapter forward samples, up to the rounding of W + ΔW,
    and leaves the base weights bit for bit as they were."""
    from tandem.policies.lora import MergedLoRA

    cfg = make_cfg(tiny_model_path, guidance_scale=1.5, sde_window_size=2, sde_window_range=[0, 4])
    cfg.optim.lora.enabled = True
    policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
    assert not policy.merged_rollout.enabled  # rollout numerics are the training forward's: nothing to merge for
    torch.manual_seed(0)
    layers = MergedLoRA.layers(policy.model)
    for layer in layers:  # as after training (peft starts B at zero)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    weights = [layer.get_base_layer().weight.clone() for layer in layers]
    prompts, meta = ["a red apple", 'a sign "OPEN"'], [{}, {}]
    adapters = policy.rollout(prompts, meta, group_size=2, seed=4)
    policy.merged_rollout.enabled = True
    merged = policy.rollout(prompts, meta, group_size=2, seed=4)
    with torch.no_grad(), policy.model.disable_adapter():
        base = policy.rollout(prompts, meta, group_size=2, seed=4)
    assert (base.extras["x0"] - adapters.extras["x0"]).abs().max() > 1e-3  # the adapters matter here
    torch.testing.assert_close(merged.extras["next_latents"], adapters.extras["next_latents"], atol=1e-4, rtol=0)
    torch.testing.assert_close(merged.old_log_probs, adapters.old_log_probs, atol=1e-2, rtol=1e-5)
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, weights))
    compiled = make_cfg(tiny_model_path, guidance_scale=1.5, sde_window_size=2, sde_window_range=[0, 4], compile=True)
    compiled.optim.lora.enabled = True
    assert build_policy("decoder", compiled, load_pipeline(str(tiny_model_path))).merged_rollout.enabled


def test_compiled_blocks_stay_compiled_across_glyph_lengths_and_grad_modes(tiny_model_path):
    """Rollouts (no grad) and training forwards (grad) over prompts of other glyph lengths: every input layout
    the blocks meet gets its compiled variant, none is refused by dynamo's recompile limit (and run eager)."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from tandem.rl.runtime import configure_torch

    torch._dynamo.reset()  # variants compiled by other tests count toward the limit
    cfg = make_cfg(tiny_model_path, guidance_scale=1.5, sde_window_size=2, sde_window_range=[0, 4], compile=True)
    configure_torch(cfg)
    policy = build_policy("decoder", cfg, load_pipeline(str(tiny_model_path)))
    for seed, prompts in enumerate([["a red apple", 'a sign "OPEN"'], ['a poster "GRAND OPENING SALE"', 'a mug "HI"']]):
        batch = policy.rollout(prompts, [{}, {}], group_size=4, seed=seed)
        out = policy.log_probs(batch.select(torch.arange(4)), policy.unit_chunks(batch)[0], with_kl=False)
        out.log_probs.sum().backward()
    variants = len(_debug_get_cache_entry_list(GlmImageTransformerBlock.forward.__code__))
    assert 1 < variants < torch._dynamo.config.recompile_limit  # at the limit, the next layout would run eager
    torch._dynamo.reset()


def test_batched_cfg_is_the_two_call_cfg_when_glyph_lengths_match(tiny_model_path):
    """``decoder.cfg_batch``: one call of 2B gives the two-call CFG velocity when nothing needs padding (prompts
    without quoted text: both branches see the glyph of ""), and differs only through the padding otherwise."""
    from tandem.policies.glm_image import GlmImageAdapter

    pipe = load_pipeline(str(tiny_model_path))
    a = GlmImageAdapter(pipe)
    grids = a.grids(64, 64)
    prior = a.upsample_prior(torch.randint(0, 16, (2, grids.num_full), generator=torch.Generator().manual_seed(0)), grids)
    x = torch.randn(a.latent_shape(2, 64, 64), generator=torch.Generator().manual_seed(1))
    t = a.schedule(6, 64, 64)[0][2]
    neg = a.glyph_embeds(["", ""])
    plain = a.glyph_embeds(["a red apple", "a blue car"])
    assert plain.shape == neg.shape
    two = a.velocity(pipe.transformer, x, t, prior, plain, neg, 1.5, 64, 64)
    one = a.velocity(pipe.transformer, x, t, prior, plain, neg, 1.5, 64, 64, batch_cfg=True)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    quoted = a.glyph_embeds(['a sign "OPEN"', 'a sign "CLOSED"'])
    assert quoted.shape[1] > neg.shape[1]
    two = a.velocity(pipe.transformer, x, t, prior, quoted, neg, 1.5, 64, 64)
    one = a.velocity(pipe.transformer, x, t, prior, quoted, neg, 1.5, 64, 64, batch_cfg=True)
    assert torch.isfinite(one).all() and not torch.allclose(one, two, atol=1e-5)
