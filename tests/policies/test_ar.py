"""AR policy on a tiny random-init GLM-Image (real classes, CPU, fp32): sampler log-probs, positions, on-policy
ratio, KL at init, segment weights, per-group decoder seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.ar_sampler import GenerateSampler, capture_rope_positions
from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.settings import PolicySettings
from tandem.policies.tiny import CODEBOOK
from tandem.rl.config import ConfigError, JobConfig

PROMPTS = ["a cat", 'a sign that says "OPEN" on a wooden table']  # different lengths -> left padding


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tiny AR models


def make_policy(path, lora=True, sampler=None, **ar):
    cfg = JobConfig()
    cfg.model.path, cfg.model.device = path, "cpu"
    cfg.optim.lora.enabled = lora
    for key, value in ar.items():
        setattr(cfg.ar, key, value)
    pipe = load_pipeline(path, device="cpu")
    return GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"), sampler=sampler)


class Recorder:
    """Wraps a sampler and keeps its last output (with raw logits)."""

    def __init__(self):
        self.inner, self.last = GenerateSampler(keep_raw_logits=True), None

    def __call__(self, *args, **kwargs):
        self.last = self.inner(*args, **kwargs)
        return self.last


def manual_log_probs(raw, tokens, suppress, temperature, top_k, top_p):
    """Independent suppress -> temperature -> top-k -> top-p, then log-softmax at ``tokens``."""
    z = raw.float().clone()
    z[..., suppress] = float("-inf")
    z = z / temperature
    if top_k:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        probs, order = z.softmax(-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def ratios(policy, rollout):
    lp = policy.log_probs(rollout, policy.unit_chunks(rollout)[0], with_kl=True)
    return lp, torch.exp(lp.log_probs - rollout.old_log_probs)


# --------------------------------------------------------------------------------------------------- tests
def test_stored_log_probs_are_those_of_the_processed_sampler(tiny_path):
    rec = Recorder()
    policy = make_policy(tiny_path, sampler=rec, temperature=0.9, top_k=60, top_p=0.75)
    r = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=1)
    raw, tokens = rec.last.raw_logits, r.extras["tokens"]
    assert raw.shape == (4, policy.num_units, CODEBOOK + 4) and tokens.shape == r.old_log_probs.shape
    suppress = list(range(CODEBOOK, CODEBOOK + 4))
    expected = manual_log_probs(raw, tokens, suppress, 0.9, 60, 0.75)
    assert torch.isfinite(r.old_log_probs).all()
    torch.testing.assert_close(r.old_log_probs, expected, atol=1e-6, rtol=0)
    assert int(tokens.max()) < CODEBOOK  # markers suppressed: only codebook ids reach the decoder
    # the truncated sampler is not the temperature-only distribution
    temp_only = torch.log_softmax(raw / 0.9, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert (r.old_log_probs - temp_only).mean() > 0.05


def test_training_positions_equal_generation_positions(tiny_path):
    policy = make_policy(tiny_path)
    r = policy.rollout(PROMPTS, [{}, {}], group_size=1, seed=2)
    inner = policy.model.model
    u = policy.num_units
    # generation's own record: cached decode positions (left by the prefill) + the prefill's rope index
    decode = inner._cached_decode_position_ids[:, :, : u - 1].clone()  # (B, 3, U-1)
    mask = r.extras["attention_mask"]
    grid = r.extras["image_grid_thw"].reshape(-1, 3)
    prefill, _ = inner.get_rope_index(r.extras["input_ids"], image_grid_thw=grid, attention_mask=mask,
                                      images_per_sample=torch.tensor([2, 2]))
    expected = torch.cat([prefill.permute(1, 0, 2), decode], dim=-1)  # (B, 3, L+U-1)
    torch.testing.assert_close(r.extras["position_ids"], expected, rtol=0, atol=0)
    # the rule (docs/glm_image_facts.md): prompt ramp; preview grid at base b = valid length, full grid at b + 16
    g = policy.grids
    for i in range(2):
        lv = int(mask[i].sum())
        pos = r.extras["position_ids"][i, :, mask.shape[1]:]
        b = lv
        row, col = 5, 7  # preview token (5, 7), fed at index 5*pw+7
        assert pos[:, 5 * g.pw + 7].tolist() == [b, b + row, b + col]
        b2 = b + max(g.ph, g.pw)
        assert pos[:, g.num_preview + g.tw].tolist() == [b2, b2 + 1, b2]  # full token (1, 0)
        assert pos[:, g.num_preview + 1].tolist() == [b2, b2, b2 + 1]  # full token (0, 1)
    # what the training forward feeds the model
    with capture_rope_positions(policy.model) as seen:
        policy.log_probs(r, slice(0, u), with_kl=False)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].permute(1, 0, 2), r.extras["position_ids"], rtol=0, atol=0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_first_ratio_is_one_and_kl_zero_at_init(tiny_path, lora):
    policy = make_policy(tiny_path, lora=lora, top_k=40)
    r = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=3)
    assert (r.extras["attention_mask"] == 0).any()  # prompts of different lengths: left padding exercised
    lp, ratio = ratios(policy, r)
    assert lp.log_probs.requires_grad
    n = policy.num_preview
    for name, seg in (("preview", ratio[:, :n]), ("full", ratio[:, n:])):
        assert (seg - 1).abs().max() < 1e-5, (name, (seg - 1).abs().max())
    assert lp.kl.shape == r.old_log_probs.shape
    assert lp.kl.abs().max() == 0


def test_segment_loss_weights_land_in_mask(tiny_path):
    policy = make_policy(tiny_path, preview_loss_weight=0.25, full_loss_weight=2.0)
    r = policy.rollout(PROMPTS[:1], [{}], group_size=2, seed=4)
    g = policy.grids
    assert r.mask.shape == (2, g.num_preview + g.num_full) == r.old_log_probs.shape
    assert torch.all(r.mask[:, : g.num_preview] == 0.25) and torch.all(r.mask[:, g.num_preview:] == 2.0)
    assert r.extras["full_tokens"].shape == (2, g.num_full)
    assert torch.equal(r.extras["full_tokens"], r.extras["tokens"][:, g.num_preview:])
    assert policy.unit_chunks(r) == [slice(0, g.num_preview + g.num_full)]


def test_same_seed_per_group_identical_tokens_identical_images(tiny_path):
    policy = make_policy(tiny_path, top_k=1)  # greedy: every copy of a prompt writes the same tokens
    r = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=5)
    assert r.images.shape == (4, 64, 64, 3) and r.images.dtype == np.uint8
    assert list(r.group_ids) == [0, 0, 1, 1] and r.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    seeds = r.extras["decode_seeds"].tolist()
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    for a, b in ((0, 1), (2, 3)):
        assert torch.equal(r.extras["tokens"][a], r.extras["tokens"][b])
        assert np.array_equal(r.images[a], r.images[b])
    assert not np.array_equal(r.images[0], r.images[2])


def test_seeds_per_group_not_per_process(tiny_path):
    """Another process's copies of the same groups (first_copy) get the same decoder noise but other tokens."""
    policy = make_policy(tiny_path)
    mine = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=7, first_group=4, first_copy=0)
    other = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=7, first_group=4, first_copy=2)
    assert torch.equal(mine.extras["decode_seeds"], other.extras["decode_seeds"])
    assert not torch.equal(mine.extras["tokens"], other.extras["tokens"])
    later = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=7, first_group=6, first_copy=0)
    assert set(later.extras["decode_seeds"].tolist()).isdisjoint(mine.extras["decode_seeds"].tolist())


def test_copies_split_over_calls_sample_what_one_call_samples(tiny_path):
    """Two processes each holding 2 of a group's 4 copies (first_copy 0 and 2) sample the tokens, log-probs and
    decoder seeds one call holding all 4 samples: every copy draws from its own seed (seed, group, copy)."""
    policy = make_policy(tiny_path)
    whole = policy.rollout(PROMPTS, [{}, {}], group_size=4, seed=7, first_group=3)
    halves = [policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=7, first_group=3, first_copy=c) for c in (0, 2)]
    # whole: [g0 c0-3, g1 c0-3]; halves concatenated: [g0 c0-1, g1 c0-1, g0 c2-3, g1 c2-3]
    order = torch.tensor([(c // 2) * 4 + g * 2 + c % 2 for g in range(2) for c in range(4)])
    for key in ("tokens", "decode_seeds"):
        assert torch.equal(torch.cat([h.extras[key] for h in halves])[order], whole.extras[key]), key
    torch.testing.assert_close(torch.cat([h.old_log_probs for h in halves])[order], whole.old_log_probs, atol=1e-5, rtol=0)



def assert_same_rollout(got, want):
    """Same samples, images and training inputs; the sampler's log-probs up to the rounding of another batch."""
    assert got.prompts == want.prompts and np.array_equal(got.images, want.images)
    assert set(got.extras) == set(want.extras)
    for key, value in want.extras.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got.extras[key], value), key
        else:
            assert got.extras[key] == value, key
    torch.testing.assert_close(got.old_log_probs, want.old_log_probs, atol=1e-5, rtol=0)


def test_prefetched_batch_gives_each_call_what_it_would_sample(tiny_path):
    """prefetch draws a whole batch (prompts of different lengths, this process's copies 2-3) in one sampler call;
    each rollout call then returns exactly its own call's samples, prompt padding included."""
    policy = make_policy(tiny_path)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[0] + " on a mat"]
    calls = [(0, 1), (1, 3)]  # (first group, end): the long prompt alone, then the two short ones
    want = [policy.rollout(prompts[a:b], [{}] * (b - a), group_size=2, seed=9, first_group=a, first_copy=2)
            for a, b in calls]
    policy.prefetch(prompts, [{}] * 3, group_size=2, seed=9, first_copy=2)
    for (a, b), expected in zip(calls, want):
        got = policy.rollout(prompts[a:b], [{}] * (b - a), group_size=2, seed=9, first_group=a, first_copy=2)
        assert_same_rollout(got, expected)
    assert got.extras["input_ids"].shape[1] < want[0].extras["input_ids"].shape[1]  # the batch's padding is removed
    _, r = ratios(policy, got)
    torch.testing.assert_close(r, torch.ones_like(r), atol=1e-4, rtol=0)
    # used up: a later call of the same seed samples on its own; a call out of the batch's order is refused
    assert_same_rollout(policy.rollout(prompts[1:3], [{}] * 2, group_size=2, seed=9, first_group=1, first_copy=2),
                        want[1])
    policy.prefetch(prompts, [{}] * 3, group_size=2, seed=9, first_copy=2)
    with pytest.raises(RuntimeError, match="prefetched"):
        policy.rollout(prompts[1:3], [{}] * 2, group_size=2, seed=9, first_group=0, first_copy=2)


def test_render_merges_a_joint_jobs_decoder_lora(tiny_path):
    """In a joint job the AR stage renders with the DiT that carries the decoder stage's LoRA: merged while it
    renders (no adapter matmuls), it paints the adapter forward's images and gives the base weights back bit for bit."""
    from tandem.policies.lora import LoraSettings, MergedLoRA, apply_lora

    policy = make_policy(tiny_path)
    dit = apply_lora(policy.decoder.denoiser, LoraSettings(enabled=True, r=4, alpha=8))  # as the decoder stage does
    torch.manual_seed(0)
    layers = MergedLoRA.layers(dit)
    for layer in layers:  # as after training (peft starts B at zero)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    weights = [layer.get_base_layer().weight.clone() for layer in layers]
    adapter_calls = []
    hook = layers[0].lora_A["default"].register_forward_hook(lambda *args: adapter_calls.append(1))
    merged = policy.rollout(PROMPTS, [{}, {}], group_size=1, seed=3)
    assert not adapter_calls
    policy.render_merged.enabled = False
    adapters = policy.rollout(PROMPTS, [{}, {}], group_size=1, seed=3)
    assert adapter_calls
    hook.remove()
    with dit.disable_adapter():
        base = policy.rollout(PROMPTS, [{}, {}], group_size=1, seed=3)
    assert not np.array_equal(base.images, adapters.images)  # the adapters matter here
    assert np.abs(merged.images.astype(int) - adapters.images.astype(int)).max() <= 1
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, weights))

def test_update_moves_log_probs_and_kl(tiny_path):
    policy = make_policy(tiny_path)
    r = policy.rollout(PROMPTS, [{}, {}], group_size=2, seed=6)
    params = policy.trainable_parameters()
    assert params and all("lora_" in k for k in policy.trainable_state_dict())
    opt = torch.optim.Adam(params, lr=1e-2)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    lp = policy.log_probs(r, slice(0, policy.num_units), with_kl=False)
    (-(adv[:, None] * lp.log_probs).mean()).backward()
    opt.step()
    policy.on_optimizer_step()
    lp2, ratio = ratios(policy, r)
    assert torch.isfinite(lp2.log_probs).all() and torch.isfinite(lp2.kl).all()
    assert (ratio - 1).abs().max() > 1e-3 and lp2.kl.mean() > 0


def test_sample_and_lora_target_errors(tiny_path):
    policy = make_policy(tiny_path)
    images = policy.sample(PROMPTS, [{}, {}], seed=0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    with pytest.raises(ConfigError, match="q_proj"):
        cfg = JobConfig()
        cfg.model.path, cfg.model.device = tiny_path, "cpu"
        cfg.optim.lora.enabled, cfg.optim.lora.target_modules = True, ["to_qq"]
        GlmImageARPolicy.from_config(cfg)


def test_processing_check_tolerates_boundary_ties_but_not_extra_processors():
    from tandem.policies.ar_sampler import _check_same_processing

    g = torch.Generator().manual_seed(0)
    theirs = torch.randn(2, 3, 2000, generator=g)
    theirs[theirs < 0.5] = float("-inf")  # a nucleus
    _check_same_processing(theirs.clone(), theirs)  # identical: fine
    tie = theirs.clone()
    edge = torch.isfinite(theirs).nonzero()[0]
    tie[tuple(edge)] = float("-inf")  # one token left the nucleus (a tie at the boundary), tiny rounding elsewhere
    _check_same_processing(tie + 1e-6 * torch.isfinite(tie), theirs)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        _check_same_processing(theirs / 1.2, theirs)  # a penalty-like rescaling of every kept value
    narrower = theirs.clone()
    narrower[theirs < 1.0] = float("-inf")  # a min-p-like cut of many tokens
    with pytest.raises(RuntimeError, match="does not reproduce"):
        _check_same_processing(narrower, theirs)
