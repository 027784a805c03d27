"""StaticCacheSampler (policies/ar_engine.py) on a tiny random-init GLM-Image (real classes, CPU, fp32): the same
tokens, log-probs and MRoPE positions as GenerateSampler under the same row seeds; log-probs equal to an independent
teacher-forced recompute; GlmImageARPolicy's first ratio is 1 with it; decode-position rule incl. source images."""

from __future__ import annotations

import pytest
import torch

from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.ar_engine import StaticCacheSampler, decode_positions, prompt_positions
from tandem.policies.ar_sampler import GenerateSampler, LogitsProcessing, prompt_inputs
from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.lora import MergedLoRA
from tandem.policies.settings import PolicySettings
from tandem.policies.tiny import CODEBOOK, IMAGE_END, IMAGE_START, VISION_VOCAB
from tandem.rl.config import JobConfig

PROMPTS = ["a cat", "a cat", 'a sign that says "OPEN" on a wooden table', 'a sign that says "OPEN" on a wooden table']
SUPPRESS = tuple(range(CODEBOOK, VISION_VOCAB))
PROCESSINGS = {
    "release": LogitsProcessing(SUPPRESS, temperature=0.9, top_k=0, top_p=0.75),
    "all": LogitsProcessing(SUPPRESS, temperature=0.9, top_k=60, top_p=0.75),
    "temperature": LogitsProcessing(SUPPRESS, temperature=1.3),
    "top_k": LogitsProcessing(SUPPRESS, top_k=5),
}


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tiny AR models


@pytest.fixture(scope="module")
def pipe(tiny_path):
    return load_pipeline(tiny_path, device="cpu")


@pytest.fixture(scope="module")
def adapter(pipe):
    return GlmImageAdapter(pipe)


def seeds(seed, rows=len(PROMPTS)):
    """One sampler seed per prompt row."""
    return [seed * 100 + i for i in range(rows)]


def inputs_for(adapter, prompts=PROMPTS, size=(64, 64)):
    g = adapter.grids(*size)
    return prompt_inputs(adapter.ar_inputs(list(prompts), *size)), g.num_preview + g.num_full


def manual_log_probs(raw, tokens, p: LogitsProcessing):
    """Independent suppress -> temperature -> top-k -> top-p, then log-softmax at ``tokens``."""
    z = raw.float().clone()
    z[..., list(p.suppress_ids)] = float("-inf")
    z = z / p.temperature
    if p.top_k:
        kth = z.topk(p.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if p.top_p < 1:
        probs, order = z.softmax(-1).sort(dim=-1, descending=True)
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p  # mass of strictly more likely tokens
        drop_sorted[..., 0] = False
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(PROCESSINGS))
def test_same_tokens_log_probs_positions_as_generate(pipe, adapter, name):
    model, processing = pipe.vision_language_encoder, PROCESSINGS[name]
    inputs, u = inputs_for(adapter)
    assert (inputs["attention_mask"] == 0).any()  # different prompt lengths: left padding exercised
    for seed in (0, 11):
        ref = GenerateSampler(keep_raw_logits=True)(model, inputs, u, processing, seeds(seed))
        out = StaticCacheSampler(keep_raw_logits=True)(model, inputs, u, processing, seeds(seed))
        assert out.tokens.shape == out.log_probs.shape == (4, u) and out.tokens.dtype == torch.int64
        assert out.position_ids.shape == (4, 3, inputs["input_ids"].shape[1] + u - 1)
        assert torch.equal(out.tokens, ref.tokens)  # the same draw per row (SeededDraws)
        torch.testing.assert_close(out.log_probs, ref.log_probs, atol=1e-5, rtol=0)
        assert torch.equal(out.position_ids, ref.position_ids)
        torch.testing.assert_close(out.raw_logits, ref.raw_logits, atol=1e-5, rtol=0)
        assert torch.isfinite(out.log_probs).all() and int(out.tokens.max()) < CODEBOOK
    # the group's copies of a prompt still draw different tokens
    assert not torch.equal(out.tokens[0], out.tokens[1])


@pytest.mark.parametrize("make", [GenerateSampler, StaticCacheSampler], ids=["generate", "engine"])
def test_row_tokens_depend_on_its_prompt_and_seed_only(pipe, adapter, make):
    """Each row draws from its own seeded stream: its tokens are the same in a batch of 4, in the batch reversed
    (other neighbours, padding and rank in the batch) and alone, so processes holding different copies of a group
    sample what one process holding them all samples."""
    model, processing = pipe.vision_language_encoder, PROCESSINGS["release"]
    inputs, u = inputs_for(adapter)
    batch = make()(model, inputs, u, processing, seeds(7))
    rev = [3, 2, 1, 0]
    reversed_inputs, _ = inputs_for(adapter, [PROMPTS[i] for i in rev])
    out = make()(model, reversed_inputs, u, processing, [seeds(7)[i] for i in rev])
    assert torch.equal(out.tokens, batch.tokens[rev])
    torch.testing.assert_close(out.log_probs, batch.log_probs[rev], atol=1e-5, rtol=0)
    for i in (1, 2):  # the short prompt (padded in the batch) and the long one
        alone_inputs, _ = inputs_for(adapter, [PROMPTS[i]])
        alone = make()(model, alone_inputs, u, processing, [seeds(7)[i]])
        assert torch.equal(alone.tokens[0], batch.tokens[i]), i
        torch.testing.assert_close(alone.log_probs[0], batch.log_probs[i], atol=1e-5, rtol=0)


def test_log_probs_equal_teacher_forced_recompute(pipe, adapter):
    """Independent of generate: one uncached forward over prompt + tokens with the engine's positions, the
    processing re-implemented by hand."""
    model, processing = pipe.vision_language_encoder, PROCESSINGS["all"]
    inputs, u = inputs_for(adapter)
    out = StaticCacheSampler()(model, inputs, u, processing, seeds(3))
    b = out.tokens.shape[0]
    ids = torch.cat([inputs["input_ids"], out.tokens[:, :-1]], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(b, u - 1, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=out.position_ids.permute(1, 0, 2),
                       use_cache=False, logits_to_keep=u).logits
    expected = manual_log_probs(logits, out.tokens, processing)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out.log_probs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(64, 128), (96, 32)], ids=["64x128", "96x32"])
def test_positions_follow_grid_rule_for_non_square_sizes(pipe, adapter, size):
    model, processing = pipe.vision_language_encoder, PROCESSINGS["top_k"]
    inputs, u = inputs_for(adapter, PROMPTS[1:3], size)
    g = adapter.grids(*size)
    out = StaticCacheSampler()(model, inputs, u, processing, seeds(1, 2))
    ref = GenerateSampler()(model, inputs, u, processing, seeds(1, 2))
    assert torch.equal(out.position_ids, ref.position_ids) and torch.equal(out.tokens, ref.tokens)
    mask, L = inputs["attention_mask"], inputs["input_ids"].shape[1]
    for i in range(2):
        pos = out.position_ids[i, :, L:]
        b = int(mask[i].sum())  # the prompt ramp ends at valid length - 1
        assert pos[:, g.pw + 1].tolist() == [b, b + 1, b + 1]  # preview (1, 1)
        b2 = b + max(g.ph, g.pw)
        assert pos[:, g.num_preview + g.tw].tolist() == [b2, b2 + 1, b2]  # full (1, 0)
        row, col = divmod(g.num_full - 2, g.tw)  # the last full-grid token fed back
        assert pos[:, g.num_preview + g.num_full - 2].tolist() == [b2, b2 + row, b2 + col]


def test_decode_positions_skip_complete_source_images(pipe):
    """A prompt holding one complete image (start ... end markers) and two grids to generate: the rule skips the
    complete image's grid and matches the model's own cached decode positions."""
    inner = pipe.vision_language_encoder.model
    ids = torch.tensor([[0, 0, 5, 6, IMAGE_START, 7, 7, 7, 7, IMAGE_END, 8, 9, IMAGE_START],
                        [3, 4, 5, 6, IMAGE_START, 7, 7, 7, 7, IMAGE_END, 8, 9, IMAGE_START]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    grids = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 3, 3]] * 2)
    per = torch.tensor([3, 3])
    inputs = dict(input_ids=ids, attention_mask=mask, image_grid_thw=grids, images_per_sample=per)
    ppos = prompt_positions(pipe.vision_language_encoder, inputs)
    cached = inner._cached_decode_position_ids  # left by get_rope_index: generate's record
    assert cached.shape == (2, 3, 3 * 3 + 2 * 4 + 1)
    ours = decode_positions(ids, mask, ppos, grids, per, IMAGE_END, cached.shape[-1])
    assert torch.equal(ours, cached)
    with pytest.raises(ValueError, match="decode positions"):
        decode_positions(ids, mask, ppos, grids, per, IMAGE_END, cached.shape[-1] + 1)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_policy_rollout_with_engine_ratio_one(tiny_path, lora):
    cfg = JobConfig()
    cfg.model.path, cfg.model.device = tiny_path, "cpu"
    cfg.optim.lora.enabled = lora
    cfg.ar.top_k = 40
    cfg.ar.sampler = "engine"  # the config route: GlmImageARPolicy builds the StaticCacheSampler itself
    pipe = load_pipeline(tiny_path, device="cpu")
    policy = GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"))
    assert isinstance(policy.sampler, StaticCacheSampler)
    if lora:  # as after training (peft starts B at zero): the engine merges the adapters into the weights per call
        torch.manual_seed(0)
        for layer in MergedLoRA.layers(policy.model):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
        weights = [layer.get_base_layer().weight.clone() for layer in MergedLoRA.layers(policy.model)]
    r = policy.rollout(PROMPTS[1:3], [{}, {}], group_size=2, seed=3)
    if lora:  # the base weights are the reference's: bit for bit what they were, the adapters on again
        after = [layer.get_base_layer().weight for layer in MergedLoRA.layers(policy.model)]
        assert len(after) == len(weights) and all(torch.equal(a, b) for a, b in zip(after, weights))
    assert (r.extras["attention_mask"] == 0).any()
    lp = policy.log_probs(r, policy.unit_chunks(r)[0], with_kl=True)
    ratio = torch.exp(lp.log_probs - r.old_log_probs)
    assert (ratio - 1).abs().max() < 1e-5, (ratio - 1).abs().max()
    assert lp.kl.abs().max() > 0 if lora else lp.kl.abs().max() == 0
    # a drop-in for GenerateSampler: the same rollout, token for token
    policy.sampler = GenerateSampler()
    r2 = policy.rollout(PROMPTS[1:3], [{}, {}], group_size=2, seed=3)
    assert torch.equal(r.extras["tokens"], r2.extras["tokens"])
    assert torch.equal(r.extras["position_ids"], r2.extras["position_ids"])
    torch.testing.assert_close(r.old_log_probs, r2.old_log_probs, atol=1e-5, rtol=0)


def test_internal_padding_and_graph_flag_on_cpu(pipe, adapter):
    """Left-padding the prompt to a bucket (as the CUDA-graph path does) changes nothing the caller sees; the
    graph flag is ignored on CPU."""
    model, processing = pipe.vision_language_encoder, PROCESSINGS["release"]
    inputs, u = inputs_for(adapter)
    base = StaticCacheSampler()(model, inputs, u, processing, seeds(5))
    for sampler in (StaticCacheSampler(pad_prompt_to=16), StaticCacheSampler(use_cuda_graph=True)):
        out = sampler(model, inputs, u, processing, seeds(5))
        assert torch.equal(out.tokens, base.tokens) and torch.equal(out.position_ids, base.position_ids)
        torch.testing.assert_close(out.log_probs, base.log_probs, atol=1e-5, rtol=0)


def test_seeded_and_caller_rng_untouched(pipe, adapter):
    model, processing = pipe.vision_language_encoder, PROCESSINGS["release"]
    inputs, _ = inputs_for(adapter)
    sampler = StaticCacheSampler()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sampler(model, inputs, 20, processing, seeds(9))
    assert torch.equal(torch.get_rng_state(), state)
    b = sampler(model, inputs, 20, processing, seeds(9))
    c = sampler(model, inputs, 20, processing, seeds(10))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    one = sampler(model, inputs, 1, processing, seeds(9))  # prefill only
    assert torch.equal(one.tokens, a.tokens[:, :1]) and one.position_ids.shape[-1] == inputs["input_ids"].shape[1]


def test_eager_attention_implementation(tiny_path, adapter):
    pipe = load_pipeline(tiny_path, device="cpu")
    model = pipe.vision_language_encoder
    model.set_attn_implementation("eager")
    assert model.model.language_model.config._attn_implementation == "eager"
    inputs, u = inputs_for(adapter)
    processing = PROCESSINGS["all"]
    out = StaticCacheSampler()(model, inputs, u, processing, seeds(2))
    ref = GenerateSampler()(model, inputs, u, processing, seeds(2))
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.log_probs, ref.log_probs, atol=1e-5, rtol=0)


def test_errors(pipe, adapter):
    model = pipe.vision_language_encoder
    inputs, u = inputs_for(adapter)
    with pytest.raises(ValueError, match="end marker"):
        StaticCacheSampler()(model, inputs, u, LogitsProcessing(suppress_ids=(IMAGE_START,)), seeds(0))
    right = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left-padded"):
        StaticCacheSampler()(model, right, u, PROCESSINGS["release"], seeds(0))
    with pytest.raises(ValueError, match="one seed per prompt row"):
        StaticCacheSampler()(model, inputs, u, PROCESSINGS["release"], seeds(0, 3))
    with pytest.raises(ValueError, match="num_tokens"):
        StaticCacheSampler()(model, inputs, 0, PROCESSINGS["release"], seeds(0))
    with pytest.raises(ValueError, match="decode positions"):
        StaticCacheSampler()(model, inputs, u + 3, PROCESSINGS["release"], seeds(0))  # u + 2 feed the end marker


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager_loop(tiny_path, adapter):
    pipe = load_pipeline(tiny_path, device="cuda")
    model = pipe.vision_language_encoder
    ad = GlmImageAdapter(pipe)
    inputs, u = inputs_for(ad)
    processing = PROCESSINGS["all"]
    eager = StaticCacheSampler(pad_prompt_to=64)(model, inputs, u, processing, seeds(4))
    graph = StaticCacheSampler(use_cuda_graph=True)
    for _ in range(2):  # second call replays the kept graph
        out = graph(model, inputs, u, processing, seeds(4))
        assert torch.equal(out.tokens, eager.tokens)
        torch.testing.assert_close(out.log_probs, eager.log_probs, atol=1e-6, rtol=0)
        assert torch.equal(out.position_ids, eager.position_ids)


def test_compiled_decode_step_matches_eager(pipe, adapter):
    """``compile=True`` (inductor on CPU): same tokens, log-probs equal up to fusion rounding; a second call
    reuses the compiled step."""
    model = pipe.vision_language_encoder
    inputs, u = inputs_for(adapter)
    processing = PROCESSINGS["release"]
    eager = StaticCacheSampler()(model, inputs, u, processing, seeds(11))
    compiled = StaticCacheSampler(compile=True)
    for _ in range(2):
        out = compiled(model, inputs, u, processing, seeds(11))
        assert torch.equal(out.tokens, eager.tokens)
        torch.testing.assert_close(out.log_probs, eager.log_probs, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_of_compiled_step_matches_eager_loop(tiny_path):
    pipe = load_pipeline(tiny_path, device="cuda")
    inputs, u = inputs_for(GlmImageAdapter(pipe))
    processing = PROCESSINGS["all"]
    eager = StaticCacheSampler(pad_prompt_to=64)(pipe.vision_language_encoder, inputs, u, processing, seeds(4))
    out = StaticCacheSampler(use_cuda_graph=True, compile=True)(pipe.vision_language_encoder, inputs, u, processing, seeds(4))
    assert torch.equal(out.tokens, eager.tokens)
    torch.testing.assert_close(out.log_probs, eager.log_probs, atol=1e-5, rtol=0)
