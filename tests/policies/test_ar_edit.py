"""AR-stage image editing (``ar.edit``) on the tiny GLM-Image models (real classes, CPU, fp32): the source image goes
through the processor and the AR model as GlmImagePipeline(image=...) feeds it, the rollout's tokens, log-probs and
MRoPE positions are the image-conditioned model's, the training recompute feeds the same images (first ratio 1,
KL 0), the frozen decoder renders with the source, the config refuses what cannot work, and a short job trains."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tandem.core.errors import ConfigError
from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.glm_image_family import GlmFlowAdapter, render_tokens
from tandem.policies.settings import PolicySettings
from tandem.rl.config import JobConfig, apply_stage_defaults, load_config
from tandem.rl.session import job_prompts, train, training_records

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tiny AR models and jobs


@pytest.fixture(scope="module")
def policy(tiny_path):
    """Full fine-tuning (the KL reference is a frozen copy), KL on: ratio and KL both checked."""
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.model.device = tiny_path, "cpu"
    cfg.ar.edit, cfg.grpo.beta = True, 0.04
    apply_stage_defaults(cfg, "ar")
    pipe = load_pipeline(tiny_path, device="cpu")
    return GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"))


@pytest.fixture(scope="module")
def batch(policy, edit_records):
    return policy.rollout([r.prompt for r in edit_records[:2]], [r.metadata for r in edit_records[:2]], group_size=4,
                          seed=1)


def test_first_step_is_on_policy_with_the_source_images(policy, batch):
    """Stored log-probs == the training recompute (ratio 1, KL 0) on the whole batch and on a minibatch; the same
    recompute without the source images is another distribution (the stored ones are image-conditioned)."""
    g = policy.grids
    assert batch.old_log_probs.shape == (8, g.num_full) and batch.extras["num_preview"] == 0  # target grid only
    assert batch.extras["pixel_values"].shape[0] == 8 and batch.extras["image_grid_thw"].shape == (8, 2, 3)
    for rows in (torch.arange(8), torch.arange(4, 8)):
        part = batch.select(rows)
        out = policy.log_probs(part, policy.unit_chunks(part)[0], with_kl=True)
        ratio = torch.exp(out.log_probs - part.old_log_probs)
        assert (ratio - 1).abs().max().item() < 1e-5
        assert out.kl.abs().max().item() < 1e-6
    blind = {k: v for k, v in batch.extras.items() if k not in ("pixel_values", "images_per_sample")}
    out = policy.log_probs(dataclasses.replace(batch, extras=blind), slice(0, g.num_full), with_kl=False)
    assert (out.log_probs - batch.old_log_probs).abs().max().item() > 1e-3



def test_prefetched_edit_batch_gives_each_call_its_sources(policy, batch, edit_records):
    """A prefetched edit batch hands each call its rows of the source patches, grids and images per sample."""
    records = edit_records[:2]
    policy.prefetch([r.prompt for r in records], [r.metadata for r in records], group_size=4, seed=1)
    parts = [policy.rollout([r.prompt], [r.metadata], group_size=4, seed=1, first_group=i)
             for i, r in enumerate(records)]
    for key in ("pixel_values", "images_per_sample", "image_grid_thw", "tokens", "decode_seeds"):
        assert torch.equal(torch.cat([p.extras[key] for p in parts]), batch.extras[key]), key
    assert np.array_equal(np.concatenate([p.images for p in parts]), batch.images)

def test_positions_are_those_of_the_image_conditioned_prompt(policy, batch):
    """The prompt's stored MRoPE positions are get_rope_index's for the image prompt: the source's 2x2 tokens sit at
    2-D positions (b, b+row, b+col) after its start marker."""
    e = batch.extras
    model = policy.model
    expected, _ = model.model.get_rope_index(e["input_ids"], e["image_grid_thw"].flatten(0, 1), e["images_per_sample"],
                                             e["attention_mask"])
    length = e["input_ids"].shape[1]
    assert torch.equal(e["position_ids"][:, :, :length], expected.permute(1, 0, 2))
    image_id = model.config.image_token_id
    row = 0
    at = (e["input_ids"][row] == image_id).nonzero().squeeze(1)
    pos = e["position_ids"][row][:, at]  # (3, 4)
    b = int(pos[0, 0])
    assert torch.equal(pos, torch.tensor([[b] * 4, [b, b, b + 1, b + 1], [b, b + 1, b, b + 1]]))


def test_tokens_depend_on_the_source(policy, edit_records):
    """Same instruction, same seed: the same source gives the same tokens, another source other tokens."""
    prompt = ["make it red"]
    a = policy.rollout(prompt, [edit_records[0].metadata], group_size=4, seed=5)
    again = policy.rollout(prompt, [edit_records[0].metadata], group_size=4, seed=5)
    b = policy.rollout(prompt, [edit_records[1].metadata], group_size=4, seed=5)
    assert torch.equal(a.extras["tokens"], again.extras["tokens"])
    assert not torch.equal(a.extras["tokens"], b.extras["tokens"])
    assert not torch.allclose(a.old_log_probs, b.old_log_probs)


def test_rewards_see_edits_rendered_with_the_source(policy, batch, tiny_path):
    """The AR rollout's images are the frozen decoder's edit rendering (source latents and prior through the KV
    cache), not the text-to-image rendering of the same tokens."""
    pipe = policy.pipe
    ar = policy.settings.section
    seeds = batch.extras["decode_seeds"].tolist()
    tokens = batch.extras["full_tokens"]
    edit = GlmFlowAdapter(pipe, 64, 64, edit=True)
    expected = render_tokens(edit, tokens, batch.prompts, ar.decode_steps, ar.decode_guidance_scale, seeds,
                             metadata=batch.metadata)
    np.testing.assert_array_equal(batch.images, expected)
    plain = render_tokens(GlmFlowAdapter(pipe, 64, 64), tokens, batch.prompts, ar.decode_steps,
                          ar.decode_guidance_scale, seeds)
    assert np.abs(batch.images.astype(int) - plain.astype(int)).max() > 0


def test_a_source_past_the_processor_bound_is_on_policy_and_renders(tiny_path, edit_records):
    """The tiny processor's side bound lowered to 40 px (its class default is ~1002 px; a 1024x1024 source at that
    bound is tests/policies/test_glm_image_edit.py's): the 64x64 sources are past it. The AR model reads each as the 1x1 VQ grid of
    its 32x32 resized copy, the frozen decoder renders with that same copy (latents and prior ids agree: 4x4 latents,
    2x2 prior patches), and the first step is on-policy."""
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.model.device, cfg.ar.edit = tiny_path, "cpu", True
    apply_stage_defaults(cfg, "ar")
    pipe = load_pipeline(tiny_path, device="cpu")
    pipe.processor.image_processor.size = {"shortest_edge": 16 * 16, "longest_edge": 40 * 40}
    policy = GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"))
    meta = [r.metadata for r in edit_records[:2]]
    batch = policy.rollout([r.prompt for r in edit_records[:2]], meta, group_size=2, seed=1)
    assert batch.extras["image_grid_thw"][0].tolist() == [[1, 1, 1], [1, 2, 2]]  # source (bounded), target
    assert batch.images.shape == (4, 64, 64, 3) and batch.metadata[0]["reference"].shape == (64, 64, 3)
    cond = policy.decoder.source_conditions(batch.prompts, batch.metadata)
    assert cond["source_latents"].shape == (4, 4, 4, 4) and cond["source_prior"].shape == (4, 4)
    out = policy.log_probs(batch, policy.unit_chunks(batch)[0], with_kl=False)
    assert (torch.exp(out.log_probs - batch.old_log_probs) - 1).abs().max().item() < 1e-5


def test_records_without_a_source_are_refused(policy, edit_records, tiny_path, tmp_path):
    """At rollout, and before any model loads: in the training prompts, and in the eval prompts when eval runs."""
    with pytest.raises(ConfigError, match="ar.edit needs a source image"):
        policy.rollout(["make it red"], [{}], group_size=2, seed=0)
    (tmp_path / "p.jsonl").write_text('{"prompt": "make it red"}\n')
    cfg = load_config("configs/demo/edit_ar.yaml", [f"output_dir={tmp_path / 'run'}",
                                                    f"data.prompts={tmp_path / 'p.jsonl'}"], stage="ar")
    with pytest.raises(ConfigError, match="ar.edit: the prompt 'make it red' .* has no source image") as e:
        training_records(cfg, "ar")
    assert "\n" not in str(e.value)
    cfg = load_config("configs/demo/edit_ar.yaml", [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_path}",
                                                    f"data.eval_prompts={tmp_path / 'p.jsonl'}", "logging.eval_every=5"],
                      stage="ar")
    with pytest.raises(ConfigError, match="ar.edit: the prompt 'make it red' .* has no source image"):
        job_prompts(cfg, "ar")


def test_edit_ar_job_trains(tiny_model_path, tmp_path):
    """Two optimizer steps of configs/demo/edit_ar.yaml (one rollout): the first is exactly on-policy, the weights
    move, and the edit rewards are scored."""
    cfg = load_config("configs/demo/edit_ar.yaml", [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_path}",
                                                    "max_steps=2", "logging.sample_every=0", "reward_host.backend=local",
                                                    "grpo.beta=0.04"], stage="ar")
    run = train(cfg, "ar")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert abs(rows[0]["ratio/mean"] - 1) < 1e-5 and abs(rows[0]["kl"]) < 1e-6
    assert all(np.isfinite(r["reward/source_structure/mean"]) and r["grad_norm"] > 0 for r in rows)
    assert any((run / "checkpoints" / "step_2" / "vision_language_encoder").glob("*.safetensors"))


def test_joint_edit_job_trains_both_stages(tiny_model_path, tmp_path):
    """`train joint` with ar.edit and decoder.edit: an AR phase on edits, then a decoder phase on its tokens with the
    same sources; each phase's first step is on-policy."""
    from tandem.rl.session import train_joint

    cfg = load_config("configs/demo/edit_ar.yaml", [
        f"output_dir={tmp_path / 'joint'}", f"model.path={tiny_model_path}", "decoder.edit=true", "max_steps=4",
        "joint.ar_steps_per_phase=2", "joint.decoder_steps_per_phase=2", "decoder.num_steps=4",
        "decoder.sde_window_range=[0,2]", "logging.sample_every=0", "reward_host.backend=local"], stage="joint")
    run = train_joint(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["ar", "ar", "decoder", "decoder"]
    assert abs(rows[0]["ratio/mean"] - 1) < 1e-5 and abs(rows[2]["ratio/mean"] - 1) < 1e-5
    assert all(np.isfinite(r["reward/source_structure/mean"]) for r in rows)
