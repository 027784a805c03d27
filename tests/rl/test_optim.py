"""Optimisation settings: gradient accumulation, AdamW betas/eps, the LR schedule with warm-up."""

import copy

import pytest
import torch
from accelerate import Accelerator

from tandem.core.errors import ConfigError
from tandem.rl.config import SCHEDULERS, TRACKERS, JobConfig, apply_stage_defaults, load_config
from tandem.rl.session import build_policy
from tandem.rl.trainer import build_optimizer, update_on_minibatch

pytestmark = pytest.mark.slow  # tiny-model updates


@pytest.fixture(scope="module")
def decoder(tiny_path, one_thread):
    """A tiny decoder policy (full fine-tuning, fp32) and one scored rollout batch of 2 groups of 4."""
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.decoder.num_steps, cfg.grpo.mini_batch_size = tiny_path, 4, 8
    cfg.decoder.sde_window_range = [0, 3]
    apply_stage_defaults(cfg, "decoder")
    cfg.grpo.epsilon = cfg.grpo.epsilon_high = 0.2
    torch.manual_seed(0)
    policy = build_policy("decoder", cfg)
    batch = policy.rollout(["a red apple", 'a sign "OPEN"'], [{}, {}], group_size=4, seed=3)
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.75, 0.0])
    return cfg, policy, batch


def _one_step(cfg, policy, batches):
    """Parameters after one SGD step (lr 1: the change is the gradient itself; Adam's sign-like first step would
    amplify float noise in near-zero gradients), then the parameters are put back."""
    params = policy.trainable_parameters()
    before = [p.detach().clone() for p in params]
    update_on_minibatch(policy, torch.optim.SGD(params, lr=1.0), batches, cfg, Accelerator(cpu=True))
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return before, after


def test_two_accumulated_half_batches_give_the_update_of_one_whole_batch(decoder):
    cfg, policy, batch = decoder
    before, whole = _one_step(cfg, policy, batch)
    halves = [batch.select(torch.arange(0, 4)), batch.select(torch.arange(4, 8))]
    _, accumulated = _one_step(cfg, policy, halves)
    change = torch.cat([(w - b).flatten() for w, b in zip(whole, before)])
    diff = torch.cat([(a - w).flatten() for a, w in zip(accumulated, whole)])
    assert change.abs().max() > 1e-4  # the step really moved the weights
    assert diff.abs().max() <= 1e-5 * change.abs().max(), (diff.abs().max(), change.abs().max())


def test_adam_settings_and_warmup_schedule(decoder):
    cfg, policy, _ = decoder
    cfg = copy.deepcopy(cfg)
    cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.adam_epsilon = 0.8, 0.95, 1e-6
    cfg.optim.lr_scheduler, cfg.optim.warmup_steps, cfg.optim.learning_rate = "linear", 2, 1e-3
    optimizer, scheduler = build_optimizer(policy, cfg, Accelerator(cpu=True), num_steps=6)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("override, needle", [
    (["optim.warmup_steps=3"], "constant_with_warmup"),
    (["optim.lr_scheduler=sawtooth"], "optim.lr_scheduler"),
    (["optim.gradient_accumulation_steps=3"], "gradient_accumulation_steps"),
    (["logging.report_to=[tensorbored]"], "logging.report_to"),
    (["logging.save_total_limit=0"], "logging.save_total_limit"),
])
def test_bad_optimisation_settings_are_config_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("configs/demo/decoder.yaml", override, stage="decoder")


def test_a_joint_jobs_schedules_cover_each_stages_own_steps():
    from tandem.rl.session import joint_stage_steps

    cfg = JobConfig(output_dir="unused", max_steps=25)
    cfg.joint.ar_steps_per_phase, cfg.joint.decoder_steps_per_phase = 10, 10
    assert joint_stage_steps(cfg) == {"ar": 15, "decoder": 10}  # ar 10, decoder 10, ar 5


def test_choices_are_the_libraries_names():
    from accelerate.utils import LoggerType
    from transformers import SchedulerType

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}
    assert set(TRACKERS) <= {t.value for t in LoggerType}
