"""grpo.old_log_probs (recompute | sampler | auto) and the truncated importance-sampling correction."""

import json

import pytest
import torch

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


@pytest.mark.parametrize("stage, overrides, expected", [
    ("ar", {}, False),
    ("ar", {"model.dtype": "bfloat16"}, True),
    ("ar", {"ar.sampler": "engine"}, True),
    ("ar", {"optim.mixed_precision": "bf16"}, True),
    ("decoder", {"model.dtype": "bfloat16"}, False),
    ("decoder", {"decoder.compile": True}, True),
    ("decoder", {"grpo.old_log_probs": "recompute"}, True),
    ("ar", {"model.dtype": "bfloat16", "grpo.old_log_probs": "sampler"}, False),
])
def test_auto_recomputes_where_rollout_and_training_numerics_differ(stage, overrides, expected):
    cfg = JobConfig(output_dir="unused")
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    assert recomputes_old_log_probs(cfg, stage) is expected


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
