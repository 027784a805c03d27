"""fp16 mixed precision: the loss is scaled, gradients are unscaled before the clip, inf/NaN steps are skipped.

accelerate enables its GradScaler only on accelerators; on this CPU machine the test installs a CPU GradScaler
(torch.amp) into the accelerator where accelerate would, and leaves autocast off — the scaler path is under test.
"""

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs

from tandem.core.types import PromptRecord
from tandem.rl.config import JobConfig, apply_stage_defaults
from tandem.rl.run_state import RunState
from tandem.rl.session import build_policy
from tandem.rl.trainer import StageTrainer, update_on_minibatch

pytestmark = pytest.mark.slow  # tiny-model updates


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose precision cannot change: reset it around each test."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def fp32_accelerator():
    AcceleratorState._reset_state()
    return Accelerator(cpu=True)


def fp16_accelerator(scale=2.0**16):
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision="fp16", kwargs_handlers=[AutocastKwargs(enabled=False)])
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=scale), True  # what accelerate does on a GPU
    return acc


@pytest.fixture(scope="module")
def setup(tiny_model_path, one_thread):
    cfg = JobConfig(output_dir="unused")
    cfg.model.path = str(tiny_model_path)
    apply_stage_defaults(cfg, "decoder")
    cfg.decoder.num_steps, cfg.grpo.mini_batch_size, cfg.grpo.num_generations = 6, 4, 4
    cfg.optim.max_grad_norm = 1e-3  # active: it must see the true norm
    policy = build_policy("decoder", cfg)
    batch = policy.rollout(["a red apple"], [{}], group_size=4, seed=3)
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    start = {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}
    return cfg, policy, batch, start


def one_step(setup, accelerator, advantages=None):
    cfg, policy, batch, start = setup
    with torch.no_grad():
        for n, p in policy.trainable_named_parameters():
            p.copy_(start[n])
    trainer = StageTrainer("decoder", cfg, policy, None, None, accelerator, RunState(), [PromptRecord("a", {})],
                           cfg.max_steps)
    if advantages is not None:
        batch = batch.select(torch.arange(len(batch)))
        batch.advantages = advantages
    metrics = update_on_minibatch(policy, trainer.optimizer, batch, cfg, accelerator)
    return metrics, {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}


def test_fp16_gradients_are_unscaled_before_the_clip(setup):
    fp32, w32 = one_step(setup, fp32_accelerator())
    fp16, w16 = one_step(setup, fp16_accelerator())
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-4)  # not 65536x
    assert fp16["optim/step_skipped"] == 0.0 and fp16["optim/loss_scale"] == 2.0**16
    assert all(torch.allclose(w16[n], w32[n], rtol=1e-4, atol=1e-6) for n in w32)


def test_fp16_step_with_nan_gradients_is_skipped_and_the_scale_drops(setup):
    _, _, _, start = setup
    metrics, weights = one_step(setup, fp16_accelerator(), advantages=torch.tensor([math.nan, 1.0, -1.0, 0.0]))
    assert all(torch.equal(weights[n], start[n]) for n in start)  # untouched, not NaN
    assert metrics["optim/step_skipped"] == 1.0 and metrics["optim/loss_scale"] == 2.0**15
