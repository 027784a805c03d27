"""grpo.old_log_probs (recompute | sampler | auto) and the truncated importance-sampling correction."""

import json
from types import SimpleNamespace

import pytest
import torch

from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.flow import FlowPolicy
from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.glm_image_family import GlmFlowAdapter
from tandem.policies.settings import PolicySettings
from tandem.policies.token_samplers import token_sampler

from tandem.rl.config import JobConfig, load_config
from tandem.rl.losses import policy_loss
from tandem.rl.session import train
from tandem.rl.trainer import recomputes_old_log_probs

pytestmark = pytest.mark.slow  # tiny-model jobs


def test_truncated_is_weights_scale_the_surrogate_per_unit():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=g) * 0.1, torch.randn(3, 5, generator=g) * 0.1
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 5)
    weights = torch.rand(3, 5, generator=g) * 2
    loss, _ = policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo", is_weights=weights)
    ratio = torch.exp(logp - old)
    per_unit = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * weights
    torch.testing.assert_close(loss, per_unit.mean())
    plain, _ = policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo")
    assert not torch.isclose(loss, plain)


def _config(overrides):
    cfg = JobConfig(output_dir="unused")
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("overrides, expected", [
    ({}, True),
    ({"model.dtype": "bfloat16"}, False),
    ({"optim.mixed_precision": "bf16"}, False),
    ({"ar.compile": True}, False),
    ({"ar.sampler": "engine"}, False),
])
def test_the_token_sampler_says_whether_the_ar_rollout_matches_training(overrides, expected):
    cfg = _config(overrides)
    assert token_sampler(cfg.ar.sampler).rollout_matches_training(PolicySettings.from_job(cfg, "ar")) is expected


@pytest.mark.parametrize("compile_, expected", [(False, True), (True, False)])
def test_the_flow_policy_matches_training_unless_compiled(tiny_path, compile_, expected):
    cfg = _config({"decoder.compile": compile_, "model.dtype": "bfloat16"})  # the decoder's layouts agree in bf16
    adapter = GlmFlowAdapter(load_pipeline(tiny_path, device="cpu"), 64, 64)
    policy = FlowPolicy(adapter, PolicySettings.from_job(cfg, "decoder"))
    assert policy.rollout_matches_training is expected


@pytest.mark.parametrize("compile_, expected", [(False, True), (True, False)])
def test_the_ar_policy_answers_through_its_token_sampler(tiny_path, compile_, expected):
    pipe = load_pipeline(tiny_path, device="cpu")
    settings = PolicySettings.from_job(_config({"ar.compile": compile_}), "ar")
    policy = GlmImageARPolicy(pipe, GlmImageAdapter(pipe), settings)
    assert policy.rollout_matches_training is expected


@pytest.mark.parametrize("mode, matches, layout_differs, expected", [
    ("auto", True, False, False),
    ("auto", False, False, True),
    ("auto", True, True, True),
    ("recompute", True, False, True),
    ("sampler", False, True, False),
])
def test_auto_recomputes_where_the_policy_says_rollout_and_training_numerics_differ(mode, matches, layout_differs,
                                                                                   expected):
    policy = SimpleNamespace(rollout_matches_training=matches)  # the one capability the decision reads
    assert recomputes_old_log_probs(_config({"grpo.old_log_probs": mode}), policy, layout_differs) is expected


def _first_step(tmp_path, tiny_model_path, mode):
    overrides = [f"output_dir={tmp_path / mode}", f"model.path={tiny_model_path}", "model.dtype=bfloat16",
                 "max_steps=1", "reward_host.backend=local", "logging.sample_every=0", "logging.progress=false",
                 "grpo.prompts_per_step=1", "grpo.num_generations=4", "grpo.mini_batch_size=4",
                 f"grpo.old_log_probs={mode}"]
    if mode == "recompute":
        overrides.append("grpo.rollout_is_cap=2.0")
    cfg = load_config("configs/demo/ar.yaml", overrides, stage="ar")
    run = train(cfg, "ar")
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_recompute_makes_the_first_bf16_ratio_one_and_logs_the_mismatch(tmp_path, tiny_model_path):
    """The AR stage in bf16: generate's cached forward and the teacher-forced forward round differently, so the
    sampler's log-probs put the first ratio off 1; recomputed ones put it at 1 and the gap shows in mismatch/*."""
    sampler = _first_step(tmp_path, tiny_model_path, "sampler")
    recompute = _first_step(tmp_path, tiny_model_path, "recompute")
    assert abs(recompute["ratio/mean"] - 1) < 1e-6 and recompute["ratio/max"] - recompute["ratio/min"] < 1e-5
    assert recompute["clipfrac"] == 0.0
    assert recompute["mismatch/abs/max"] > 1e-4  # the rounding the sampler's log-probs carried
    assert "mismatch/abs/mean" not in sampler
    assert sampler["ratio/max"] - sampler["ratio/min"] > 1e-4
