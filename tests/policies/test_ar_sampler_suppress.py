"""The AR sampler with and without ``ar.suppress_non_codebook`` on a tiny random-init GLM-Image whose generation
config is the release's (no suppress list): off is the release's sampler (only the end marker masked, as generate
masks it for a fixed-length grid), on keeps the sampler on VQ codes; the stored log-probs are recomputed exactly
either way; a non-codebook id in the full grid is one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.cli_run import assert_user_mistake, tandem_cli

from tandem.core.errors import ConfigError
from tandem.core.types import Rollout
from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.ar_engine import StaticCacheSampler
from tandem.policies.ar_sampler import GenerateSampler, prompt_inputs
from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.settings import PolicySettings
from tandem.policies.tiny import CODEBOOK, IMAGE_END, VISION_VOCAB
from tandem.rl.config import JobConfig

PROMPTS = ["a cat", 'a sign that says "OPEN" on a wooden table']  # different lengths -> left padding
NON_CODEBOOK = tuple(range(CODEBOOK, VISION_VOCAB))

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tiny AR models


def release_policy(path, suppress_non_codebook: bool, gen_suppress=None, **ar) -> GlmImageARPolicy:
    """GlmImageARPolicy over the tiny pipeline with the release's generation config: no ``suppress_tokens`` (the tiny
    model's saved config suppresses the non-codebook ids; the release's does not) unless ``gen_suppress``."""
    cfg = JobConfig()
    cfg.model.path, cfg.model.device = path, "cpu"
    cfg.ar.suppress_non_codebook = suppress_non_codebook
    for key, value in ar.items():
        setattr(cfg.ar, key, value)
    pipe = load_pipeline(path, device="cpu")
    pipe.vision_language_encoder.generation_config.suppress_tokens = gen_suppress
    return GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"))


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_suppressed_ids(tiny_path, on):
    expected = NON_CODEBOOK if on else (IMAGE_END,)
    assert release_policy(tiny_path, on).processing.suppress_ids == expected
    # the model's own generation_config.suppress_tokens are honoured either way (what its generate masks)
    assert release_policy(tiny_path, on, gen_suppress=[5]).processing.suppress_ids == tuple(sorted({5, *expected}))


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_off_is_transformers_generate_with_the_release_generation_config(tiny_path, on):
    """The reference: transformers' own ``generate`` with the release's generation_config.json (do_sample,
    temperature 0.9, top_p 0.75, top_k 16512 = the whole image lm_head here VISION_VOCAB, no suppress list) and
    min_new_tokens = the grid length: its processed scores are tandem's processing of its raw logits with the
    setting off; with it on, they differ exactly at the non-codebook ids other than the end marker."""
    policy = release_policy(tiny_path, on, temperature=0.9, top_p=0.75, top_k=0)
    model, u = policy.model, policy.num_units
    inputs = prompt_inputs(policy.adapter.ar_inputs(PROMPTS, 64, 64))
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, temperature=0.9, top_p=0.75, top_k=VISION_VOCAB,
                         min_new_tokens=u, max_new_tokens=u, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    raw, theirs = torch.stack(out.logits, 1), torch.stack(out.scores, 1)  # (B, U, V)
    ours = policy.processing(raw)
    assert bool(torch.isinf(theirs[..., IMAGE_END]).all())  # generate masks the end marker (min_new_tokens)
    if not on:
        assert torch.equal(ours, theirs)
        return
    others = [i for i in NON_CODEBOOK if i != IMAGE_END]
    assert torch.isinf(ours[..., others]).all() and torch.isfinite(theirs[..., others]).any()
    inside = torch.isfinite(ours)  # the codebook ids tandem keeps: same logits, a nucleus of the codes only
    torch.testing.assert_close(ours[inside], (raw / 0.9)[inside], rtol=0, atol=1e-6)


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_recompute_is_exact_either_way(tiny_path, on):
    """The rollout's stored log-probs (generate and the static-cache engine: the same tokens) against the training
    recompute: ratio 1. Off, the non-codebook ids are sampled (here in the preview grid) and stay in the
    normaliser; on, never."""
    policy = release_policy(tiny_path, on, temperature=0.9, top_p=1.0, top_k=0)
    meta, seeds = [{}, {}], [11, 12]
    inputs, out = policy._sample_tokens(PROMPTS, meta, seeds)
    engine = StaticCacheSampler()(policy.model, prompt_inputs(inputs), policy.num_units, policy.processing, seeds)
    assert torch.equal(engine.tokens, out.tokens)
    torch.testing.assert_close(engine.log_probs, out.log_probs, atol=1e-5, rtol=0)
    tokens = out.tokens
    assert not (tokens == IMAGE_END).any()
    assert bool((tokens >= CODEBOOK).any()) != on
    extras = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], tokens=tokens,
                  position_ids=out.position_ids)
    batch = Rollout(images=np.zeros((2, 64, 64, 3), np.uint8), prompts=PROMPTS, metadata=meta,
                    group_ids=np.arange(2), old_log_probs=out.log_probs,
                    mask=torch.ones_like(out.log_probs), extras=extras)
    logp = policy.log_probs(batch, slice(0, policy.num_units), with_kl=False).log_probs
    assert (torch.exp(logp - out.log_probs) - 1).abs().max() < 1e-5


def test_a_non_codebook_id_in_the_full_grid_is_one_clear_error(tiny_path):
    """Off, a sampled marker would reach the decoder (the release pipeline fails on it: IndexError in the DiT's
    prior embedding): tandem stops with one line naming the setting."""
    policy = release_policy(tiny_path, False)
    full = torch.zeros(2, policy.num_full, dtype=torch.long)
    full[1, 2] = CODEBOOK + 2
    with pytest.raises(ConfigError, match=r"sampled id 130 into the full grid of sample 1.*"
                                          r"set ar.suppress_non_codebook=true") as e:
        policy._render(full, PROMPTS, [{}, {}], [0, 0])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value,ok", [("true", True), ("false", True), ("maybe", False)])
def test_the_key_is_a_checked_bool(value, ok):
    proc = tandem_cli("train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run",
                      f"ar.suppress_non_codebook={value}")
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert f"suppress_non_codebook: {value}" in proc.stdout
    else:
        assert_user_mistake(proc, "ar.suppress_non_codebook")
