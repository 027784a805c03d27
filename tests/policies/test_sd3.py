"""The second model family: a tiny random-init StableDiffusion3Pipeline (policies/sd3.py), trained by the same
flow-GRPO loop through the generic FlowPolicy. Checks: save/from_pretrained loading, the adapter's ODE equals the
pipeline's own denoising loop, noise 0 == the scheduler's Euler step, ratio 1 and KL 0 at init, a short run."""

import json

import numpy as np
import pytest
import torch

from tandem.core.errors import ConfigError
from tandem.policies.families import get_family
from tandem.policies.sde import ode_step, sde_step
from tandem.rl.config import DecoderConfig, JobConfig, apply_stage_defaults, load_config
from tandem.rl.session import build_policy

pytestmark = pytest.mark.slow  # tiny SD3 pipelines

PROMPTS = ["a red apple", 'a sign that says "OPEN"']


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    """Folder of the tiny pipeline, written by ``save_pretrained`` through ``model.create_tiny_if_missing``."""
    cfg = JobConfig(output_dir="unused")
    cfg.model.family, cfg.model.path = "sd3", str(tmp_path_factory.getbasetemp() / "tiny-sd3")
    cfg.model.create_tiny_if_missing, cfg.model.device = True, "cpu"
    get_family("sd3").load(cfg.model)
    return cfg.model.path


@pytest.fixture(scope="module")
def pipe(sd3_path, one_thread):
    from tandem.policies.sd3 import load_pipeline

    return load_pipeline(sd3_path, device="cpu")


def make_cfg(path, **decoder):
    cfg = JobConfig(output_dir="unused")
    cfg.model.family, cfg.model.path = "sd3", str(path)
    apply_stage_defaults(cfg, "decoder")
    cfg.decoder = DecoderConfig(num_steps=6, **decoder)
    cfg.grpo.mini_batch_size = 4
    return cfg


def test_loads_through_save_and_from_pretrained(sd3_path, pipe, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    family = get_family("sd3")
    assert family.components == {"decoder": "transformer"} and set(family.policies) == {"decoder"}
    assert json.loads(open(f"{sd3_path}/model_index.json").read())["_class_name"] == "StableDiffusion3Pipeline"
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.transformer, SD3Transformer2DModel)
    assert all(getattr(pipe, n) is not None for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"))
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    cfg = make_cfg(tmp_path / "absent")
    with pytest.raises(ConfigError, match="model.path: no StableDiffusion3Pipeline"):
        family.load(cfg.model)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    cfg.model.path = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="holds a GlmImagePipeline"):
        family.load(cfg.model)
    cfg.decoder.compile = True  # SD3Transformer2DModel has no _repeated_blocks for compile_repeated_blocks
    with pytest.raises(ConfigError, match="decoder.compile: SD3Transformer2DModel"):
        build_policy("decoder", cfg, pipe)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_adapter_ode_equals_the_pipeline(pipe, guidance_scale):
    """Euler steps through the adapter (conditions, schedule, velocity with CFG, decode) reproduce
    ``StableDiffusion3Pipeline.__call__`` from the same latents; the family's ``generate`` is that call."""
    from tandem.policies.sd3 import Sd3FlowAdapter, pipeline_images

    adapter = Sd3FlowAdapter(pipe, 64, 64)
    cond = adapter.conditions(PROMPTS, [{}, {}], seed=0)
    noise = adapter.initial_noise([5, 6])
    timesteps, sigmas = adapter.schedule(5)
    x = noise
    for i, t in enumerate(timesteps):
        x = ode_step(adapter.velocity(adapter.denoiser, x, t, cond, guidance_scale), x, sigmas[i], sigmas[i + 1])
    out = pipe(prompt=PROMPTS, height=64, width=64, num_inference_steps=5, guidance_scale=guidance_scale,
               latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(x, out, rtol=0, atol=1e-5)
    cfg = make_cfg("unused", eval_num_steps=5, guidance_scale=guidance_scale)
    images = pipeline_images(pipe, PROMPTS, cfg, seed=5)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - adapter.decode(x)).max() <= 1


def test_sde_at_noise_zero_is_the_euler_step(pipe):
    from tandem.policies.sd3 import Sd3FlowAdapter

    adapter = Sd3FlowAdapter(pipe, 64, 64)
    cond = adapter.conditions(PROMPTS, [{}, {}], seed=0)
    timesteps, sigmas = adapter.schedule(4)
    x = adapter.initial_noise([1, 2])
    for i, t in enumerate(timesteps):
        v = adapter.velocity(adapter.denoiser, x, t, cond, 2.0)
        euler = pipe.scheduler.step(v, t, x, return_dict=False)[0]
        x_next, _, mean, _ = sde_step(v, x, sigmas[i], sigmas[i + 1], 0.0)
        torch.testing.assert_close(x_next, euler, rtol=0, atol=1e-6)
        torch.testing.assert_close(mean, euler, rtol=0, atol=1e-6)
        x = euler


@pytest.mark.parametrize("decoder, lora", [
    (dict(guidance_scale=3.0, sde_window_size=2, sde_window_range=[0, 5]), False),
    (dict(guidance_scale=1.0, sde_window_size=0, timestep_fraction=0.6, sde_type="cps", noise_level=0.5), True),
], ids=["cfg-window", "nocfg-fraction-cps-lora"])
def test_flow_policy_first_ratio_is_one_and_kl_is_zero(pipe, sd3_path, decoder, lora):
    cfg = make_cfg(sd3_path, **decoder)
    cfg.grpo.beta, cfg.optim.lora.enabled = 0.01, lora
    policy = build_policy("decoder", cfg, pipe)
    try:
        batch = policy.rollout(PROMPTS, [{}, {}], group_size=4, seed=1)
        assert batch.images.shape == (8, 64, 64, 3)
        for index in (torch.arange(0, 4), torch.arange(4, 8)):
            mb = batch.select(index)
            for chunk in policy.unit_chunks(mb):
                out = policy.log_probs(mb, chunk, with_kl=True)
                assert ((out.log_probs - mb.old_log_probs[:, chunk]).exp() - 1).abs().max().item() < 1e-5
                assert out.kl.abs().max().item() == 0.0
        out = policy.log_probs(batch.select(torch.arange(4)), policy.unit_chunks(batch)[0], with_kl=False)
        out.log_probs.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    finally:
        if lora:  # the module-scoped pipeline is shared: take the adapters out again
            policy.model.unload()
        pipe.transformer.requires_grad_(False).zero_grad(set_to_none=True)


def test_noise_zero_rollout_is_the_pipeline_output(pipe, sd3_path):
    """FlowPolicy's rollout at noise 0 (SDE window included) is the pipeline's deterministic sample."""
    cfg = make_cfg(sd3_path, noise_level=0.0, guidance_scale=3.0, sde_window_size=2, sde_window_range=[1, 4])
    cfg.grpo.mini_batch_size = 8
    policy = build_policy("decoder", cfg, pipe)
    try:
        batch = policy.rollout(PROMPTS[:1], [{}], group_size=2, seed=4)
    finally:
        pipe.transformer.requires_grad_(False)
    noise = policy.adapter.initial_noise([int(s) for s in batch.extras["noise_seeds"]])  # the rollout's own seeds
    out = pipe(prompt=PROMPTS[:1] * 2, height=64, width=64, num_inference_steps=6, guidance_scale=3.0,
               latents=noise, output_type="np").images
    assert np.abs(batch.images.astype(int) - (np.asarray(out) * 255).round()).max() <= 1


@pytest.mark.slow  # an end-to-end job
def test_demo_config_trains_two_steps_and_samples_from_the_checkpoint(sd3_path, tmp_path, one_thread):
    """``model.family=sd3`` through the unchanged session/trainer: 2 optimizer steps, metrics, a checkpoint of
    the transformer, and ``tandem sample`` with those weights."""
    from tandem.rl.sample import load_for_sampling
    from tandem.rl.session import train

    cfg = load_config("configs/demo/sd3_decoder.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.path={sd3_path}", "max_steps=2", "reward_host.backend=local",
        "logging.progress=false", "logging.sample_every=0", "decoder.num_steps=4", "decoder.sde_window_range=[0,3]",
        "decoder.eval_num_steps=4"], stage="decoder")
    assert cfg.model.family == "sd3"
    run = train(cfg, "decoder")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert abs(rows[0]["ratio/mean"] - 1) < 1e-5 and np.isfinite(rows[-1]["loss"])
    checkpoint = run / "checkpoints" / "step_2"
    assert (checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").is_file()  # save_pretrained layout
    family, trained = load_for_sampling(cfg, str(checkpoint))
    base = family.load(cfg.model)
    assert any(not torch.equal(a, b) for a, b in zip(trained.transformer.parameters(), base.transformer.parameters()))
    assert family.generate(trained, ["a red apple"], cfg, seed=0).shape == (1, 64, 64, 3)
