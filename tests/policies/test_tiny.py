"""Tiny GLM-Image models: save/load round trip and a real GlmImagePipeline text-to-image run."""

import json

import numpy as np
import pytest
import torch

from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.glm_image_family import GlmFlowAdapter, pipeline_images, render_tokens
from tandem.policies.tiny import CODEBOOK, build_tiny_glm_image
from tandem.rl.config import ConfigError, JobConfig

pytestmark = pytest.mark.slow  # tiny pipelines


@pytest.fixture(scope="module")
def pipe(tiny_model_path):
    return load_pipeline(str(tiny_model_path))


def test_round_trip_through_from_pretrained(tmp_path):
    from diffusers import GlmImagePipeline

    path = build_tiny_glm_image(tmp_path / "tiny", seed=1)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "GlmImagePipeline"
    loaded = GlmImagePipeline.from_pretrained(path)
    rebuilt = GlmImagePipeline.from_pretrained(build_tiny_glm_image(tmp_path / "again", seed=1))
    for name in ("vision_language_encoder", "transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(rebuilt, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert type(loaded.vision_language_encoder).__name__ == "GlmImageForConditionalGeneration"
    assert type(loaded.transformer).__name__ == "GlmImageTransformer2DModel"
    assert loaded.processor.tokenizer.padding_side == "left"
    assert loaded.vision_language_encoder.generation_config.suppress_tokens[0] == CODEBOOK


def test_prompt_layout_has_preview_and_full_grid(pipe):
    adapter = GlmImageAdapter(pipe)
    inputs = adapter.ar_inputs(["a dog", 'a sign "OPEN"'], 64, 128)
    text = pipe.processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("a dog<sop>2 4<eop><sop>11 22<eop><|dit_token_128|>")
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 4], [1, 11, 22]] * 2
    assert inputs["attention_mask"][0, 0] == 0  # left padding of the shorter prompt


def test_pipeline_text_to_image_shapes_and_determinism(pipe):
    cfg = JobConfig(output_dir="unused")
    cfg.data.height, cfg.data.width, cfg.decoder.eval_num_steps = 64, 96, 4
    prompts = ["a red apple", "写着「你好」的招牌"]
    a = pipeline_images(pipe, prompts, cfg, seed=5)
    b = pipeline_images(pipe, prompts, cfg, seed=5)
    c = pipeline_images(pipe, prompts, cfg, seed=6)
    assert a.shape == (2, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hand_written_denoising_loop_equals_the_pipeline(pipe):
    adapter = GlmFlowAdapter(pipe, 64, 64)
    tokens = torch.randint(0, CODEBOOK, (2, adapter.grids.num_full), generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", 'a poster "HI"']
    ours = render_tokens(adapter, tokens, prompts, num_steps=5, guidance_scale=1.5, seeds=[1, 2])
    out = pipe(prompt=prompts, height=64, width=64, num_inference_steps=5, guidance_scale=1.5,
               prior_token_ids=adapter.layout.upsample_prior(tokens, adapter.grids),
               latents=adapter.initial_noise([1, 2]), output_type="np").images
    assert np.array_equal(ours, (out * 255).round().astype(np.uint8))


def test_vae_decodes_one_image_at_a_time(pipe):
    """Slicing on (the peak is one image's), and a batch decodes to the images of its rows decoded alone."""
    assert pipe.vae.use_slicing
    adapter = GlmImageAdapter(pipe)
    latents = torch.randn(3, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = adapter.decode(latents)
    assert np.array_equal(whole, np.concatenate([adapter.decode(latents[i: i + 1]) for i in range(3)]))


def test_missing_model_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_pipeline(str(tmp_path / "nothing"))
