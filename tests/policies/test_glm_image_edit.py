"""Image editing on the tiny GLM-Image models: the decoder conditioned on a source image through the transformer's
KV cache (as GlmImagePipeline(image=...) does), the source_structure reward, `tandem score --sources`, and a short
training run of configs/demo/edit.yaml."""

import json

import numpy as np
import pytest
import torch

from tandem.core.errors import ConfigError
from tandem.policies.glm_image import load_pipeline
from tandem.rewards.edit import source_structure
from tandem.rl.config import DecoderConfig, JobConfig, apply_stage_defaults, load_config
from tandem.rl.session import build_policy, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tiny pipelines and jobs


@pytest.fixture(scope="module")
def policy(tiny_path):
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.model.device = tiny_path, "cpu"
    apply_stage_defaults(cfg, "decoder")
    cfg.decoder = DecoderConfig(num_steps=6, edit=True, condition_source="reference", guidance_scale=1.5)
    cfg.grpo.mini_batch_size = 4
    return build_policy("decoder", cfg, load_pipeline(tiny_path, device="cpu"))


def test_edit_velocity_follows_the_pipelines_cache_protocol(policy, edit_records):
    """Batched source write == GlmImagePipeline's per-sample write loop (kv_caches.next_sample()), then the
    conditional branch reads the cache and the unconditional one skips it."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    adapter, tr = policy.adapter, policy.model
    cond = adapter.conditions([r.prompt for r in edit_records[:2]], [r.metadata for r in edit_records[:2]], seed=0)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0])
    got = adapter.velocity(tr, x, t, cond, 1.5)

    cache = GlmImageKVCache(num_layers=tr.config.num_layers)
    cache.set_mode("write")
    for i in range(2):  # pipeline step 6: one transformer call per sample's condition image, at timestep 0
        tr(hidden_states=cond["source_latents"][i:i + 1], encoder_hidden_states=torch.zeros(1, 0, cond["glyph"].shape[-1]),
           prior_token_id=cond["source_prior"][i:i + 1], prior_token_drop=torch.zeros(1, 16, dtype=torch.bool),
           timestep=torch.zeros(1), target_size=torch.tensor([[64.0, 64.0]]), crop_coords=torch.zeros(1, 2), kv_caches=cache)
        cache.next_sample()
    layout, keep = adapter.layout, torch.zeros_like(cond["prior"], dtype=torch.bool)
    cache.set_mode("read")
    v_c = layout._transformer(tr, x, t, cond["prior"], cond["glyph"], keep, 64, 64, cache)
    cache.set_mode("skip")
    v_u = layout._transformer(tr, x, t, cond["prior"], cond["neg_glyph"], ~keep, 64, 64, cache)
    assert torch.allclose(got, v_u + 1.5 * (v_c - v_u), atol=1e-5)
    plain = {k: v for k, v in cond.items() if not k.startswith("source")}
    assert not torch.allclose(got, adapter.velocity(tr, x, t, plain, 1.5), atol=1e-4)  # the source matters


def test_edit_rollout_is_on_policy_and_needs_sources(policy, edit_records):
    batch = policy.rollout([r.prompt for r in edit_records[:2]], [r.metadata for r in edit_records[:2]], group_size=4,
                           seed=1)
    assert batch.extras["cond"]["source_latents"].shape == (8, 4, 8, 8)
    for chunk in policy.unit_chunks(batch):
        out = policy.log_probs(batch.select(torch.arange(4, 8)), chunk, with_kl=False)
        assert (out.log_probs - batch.old_log_probs[4:, chunk]).abs().max().item() < 1e-5
    with pytest.raises(ConfigError, match="decoder.edit needs a source image"):
        policy.adapter.source_conditions(["no source"], [{}])


def test_frozen_ar_writes_edit_tokens_from_the_source(tiny_path, edit_records):
    """condition_source ar + edit: the AR model reads the source's image tokens (chat-template image item) and
    writes the target grid; same seed, same tokens; another source, other tokens."""
    from tandem.policies.glm_image_family import GlmFlowAdapter

    adapter = GlmFlowAdapter(load_pipeline(tiny_path, device="cpu"), 64, 64, condition_source="ar", edit=True)
    meta = [r.metadata for r in edit_records]
    tokens = adapter.full_tokens(["make it red"] * 4, meta, seed=3)
    assert tokens.shape == (4, adapter.grids.num_full) and int(tokens.max()) < 128
    assert torch.equal(tokens, adapter.full_tokens(["make it red"] * 4, meta, seed=3))
    differs = [not torch.equal(adapter.full_tokens(["make it red"], [meta[0]], seed=s),
                               adapter.full_tokens(["make it red"], [meta[1]], seed=s)) for s in range(6)]
    assert any(differs)  # the near-uniform tiny model often samples the same ids from either source


def test_a_source_past_the_processor_bound_reaches_both_paths_at_one_size(tiny_path, edit_records):
    """The tiny image processor (GlmImageImageProcessor's class-default bounds, policies/tiny.py) keeps sides up to
    about 1002 px: it turns a 1024x1024 source into a 31x31 VQ grid, while the DiT would take 1024 px of latents
    (64x64 patches). The source reaches both paths at 992x992 (31 tokens x 32 px): the AR model's source grid, the
    DiT's source latents and prior ids agree, the AR's source tokens are the prior ids, and the decoder runs."""
    from PIL import Image

    from tandem.policies.glm_image import Grids
    from tandem.policies.glm_image_family import GlmFlowAdapter

    pipe = load_pipeline(tiny_path, device="cpu")
    adapter, prompt = GlmFlowAdapter(pipe, 1024, 1024, edit=True), ["make it red"]
    big = np.asarray(Image.fromarray(edit_records[0].metadata["reference"]).resize((1024, 1024), Image.BICUBIC))
    meta = [{"reference": big}]
    cond = adapter.source_conditions(prompt, meta)
    assert cond["source_latents"].shape == (1, 4, 124, 124) and cond["source_prior"].shape == (1, 62 * 62)
    inputs = adapter.layout.edit_inputs(prompt, big[None], 1024, 1024)  # fitted there too
    assert inputs["image_grid_thw"].tolist() == [[1, 31, 31], [1, 32, 32]]  # source, target
    ar, grid = pipe.vision_language_encoder, inputs["image_grid_thw"][:1]
    with torch.no_grad():
        ids = ar.get_image_tokens(ar.get_image_features(inputs["pixel_values"], grid).pooler_output, grid)
    assert torch.equal(adapter.layout.upsample_prior(ids.view(1, -1), Grids(31, 31, 0, 0)), cond["source_prior"])
    full = adapter.token_conditions(torch.zeros(1, 32 * 32, dtype=torch.long), prompt, with_negative=True)
    v = adapter.velocity(pipe.transformer, torch.zeros(1, 4, 128, 128), torch.tensor([500.0]), {**full, **cond}, 1.5)
    assert v.shape == (1, 4, 128, 128) and torch.isfinite(v).all()


def test_reference_tokens_of_another_grid_are_one_clear_error(tiny_path, edit_records):
    """decoder.condition_source=reference paints the reference's own VQ tokens: a job whose size the processor
    rescales (1024 px > its ~1002 px bound: 31x31 tokens, not 32x32) is refused in one line, before any rollout
    (``check_prompts``) and at use."""
    from tandem.policies.glm_image_family import GlmFlowAdapter, check_prompts

    pipe = load_pipeline(tiny_path, device="cpu")
    cfg = JobConfig(output_dir="unused")
    cfg.decoder.condition_source, cfg.data.height, cfg.data.width = "reference", 1024, 1024
    expected = (r"decoder.condition_source=reference: the image processor turns 1024x1024 images into a 31x31 VQ "
                r"grid \(it rescales images into sides of 56..1002 px\), not the 32x32 grid needed here")
    with pytest.raises(ConfigError, match=expected) as e:
        check_prompts(pipe, ["a dog"], cfg, "decoder")
    assert "\n" not in str(e.value)
    adapter = GlmFlowAdapter(pipe, 1024, 1024, condition_source="reference")
    with pytest.raises(ConfigError, match=expected):
        adapter.full_tokens(["a dog"], [{"reference": np.zeros((1024, 1024, 3), np.uint8)}], 0)
    cfg.data.height = cfg.data.width = 64
    check_prompts(pipe, ["a dog"], cfg, "decoder")  # within the bounds: one token per 32 px


def test_edit_with_batched_cfg_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="decoder.cfg_batch"):
        load_config("configs/demo/edit.yaml", ["decoder.cfg_batch=true", f"output_dir={tmp_path}"], stage="decoder")


def _ssim_one_window(x, y):
    """Wang et al. 2004 eq. 13 on one 7x7 window (population statistics)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (x.var() + y.var() + c2))


def test_source_structure_reward():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 7, 7, 3), dtype=np.uint8)
    luma = np.array([0.299, 0.587, 0.114])
    got = source_structure(a[None], ["p"], [{"reference": b}])[0]
    assert got == pytest.approx(_ssim_one_window(a @ luma, b @ luma), rel=1e-9)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    edited = src.copy()
    edited[8:16, 8:16] = 255 - edited[8:16, 8:16]  # changed inside [0.25, 0.25, 0.5, 0.5]
    whole, kept, none = source_structure(np.stack([edited] * 3), ["p"] * 3, [
        {"reference": src}, {"reference": src, "edit_region": [0.25, 0.25, 0.5, 0.5]}, {}])
    assert whole < 0.9 and kept == pytest.approx(1.0) and none is None


def test_score_cli_takes_a_source_folder(tmp_path, capsys):
    from PIL import Image

    from tandem.rewards.cli import cmd_score

    (tmp_path / "out").mkdir()
    (tmp_path / "src").mkdir()
    for name in ("a.png", "b.png"):
        Image.open("data/edit/blue_circle.png").save(tmp_path / "src" / name)
    Image.open("data/edit/blue_circle.png").save(tmp_path / "out" / "a.png")
    Image.open("data/edit/green_square.png").save(tmp_path / "out" / "b.png")
    (tmp_path / "p.txt").write_text("keep it\nchange it\n")
    assert cmd_score(["source_structure"], str(tmp_path / "out"), str(tmp_path / "p.txt"), sources_dir=str(tmp_path / "src")) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["source_structure"] == pytest.approx(1.0) and rows[1]["source_structure"] < 0.9
    (tmp_path / "src" / "b.png").unlink()
    with pytest.raises(ConfigError, match="no source image named b.png"):
        cmd_score(["source_structure"], str(tmp_path / "out"), str(tmp_path / "p.txt"), sources_dir=str(tmp_path / "src"))


@pytest.mark.slow  # an end-to-end run (4 steps)
def test_edit_demo_trains(tiny_model_path, tmp_path):
    cfg = load_config("configs/demo/edit.yaml", [f"output_dir={tmp_path / 'edit'}", f"model.path={tiny_model_path}",
                                                 "max_steps=4", "logging.sample_every=0", "reward_host.backend=local"],
                      stage="decoder")
    run = train(cfg, "decoder")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["reward/source_structure/mean"]) and r["grad_norm"] > 0 for r in rows)
    assert (run / "checkpoints" / "step_4" / "transformer").is_dir()  # the trained component, in its library format
