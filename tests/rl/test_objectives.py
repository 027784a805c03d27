"""Objectives and the other registries are the extension points: a registered name is at once a valid config
value, and the update step calls the chosen objective."""

import pytest
import torch

from tandem.core.errors import ConfigError
from tandem.core.types import LogProbs, Rollout
from tandem.rewards.config import RewardEntry
from tandem.rl.config import JobConfig, validate
from tandem.rl.losses import LOSS_TYPES, register_loss_type
from tandem.rl.objectives import OBJECTIVES, ClippedSurrogate
from tandem.rl.trainer import update_on_minibatch


class TinyPolicy:
    """One parameter theta; log pi(unit) = theta for every unit."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.zeros(()))

    def unit_chunks(self, batch):
        return [slice(0, 1), slice(1, 3)]

    def log_probs(self, batch, chunk, with_kl):
        return LogProbs(self.theta.expand(len(batch), chunk.stop - chunk.start))

    def trainable_parameters(self):
        return [self.theta]

    def on_optimizer_step(self):
        pass


class NullAccelerator:
    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def batch(n=4, units=3):
    return Rollout(images=None, prompts=["p"] * n, metadata=[{}] * n, group_ids=None,
                   old_log_probs=torch.zeros(n, units), mask=torch.ones(n, units),
                   advantages=torch.tensor([1.0, -1.0, 2.0, 0.5]))


@pytest.fixture
def squared_theta():
    @OBJECTIVES.register("test_squared_theta")
    class SquaredTheta:
        """loss = theta^2 per chunk: its gradient says the update step called it."""

        stages = ("decoder",)
        uses_old_log_probs = False
        calls = []

        def prepare(self, policy, batch, grpo):
            return batch

        def loss(self, policy, batch, chunk, grpo):
            SquaredTheta.calls.append((chunk.start, chunk.stop))
            return policy.theta ** 2 + 1.0, {"loss": 1.0, "x/min": float(chunk.start), "x/max": float(chunk.stop)}

    yield SquaredTheta
    OBJECTIVES._entries.pop("test_squared_theta")


def test_a_registered_objective_is_a_valid_choice_and_the_update_calls_it(squared_theta):
    cfg = JobConfig(output_dir="unused")
    cfg.grpo.objective = "test_squared_theta"
    cfg.grpo.epsilon = cfg.grpo.epsilon_high = 0.2
    policy = TinyPolicy()
    with torch.no_grad():
        policy.theta.fill_(0.5)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    metrics = update_on_minibatch(policy, opt, batch(), cfg, NullAccelerator())
    assert squared_theta.calls == [(0, 1), (1, 3)]
    # d/dtheta of (1/3 + 2/3) * theta^2 = 2 * theta = 1.0
    assert policy.theta.item() == pytest.approx(0.5 - 0.1 * 1.0)
    assert metrics["x/min"] == 0.0 and metrics["x/max"] == 3.0 and metrics["loss"] == pytest.approx(1.0)


def valid_job() -> JobConfig:
    cfg = JobConfig(output_dir="unused")
    cfg.grpo.epsilon = cfg.grpo.epsilon_high = 1e-4
    cfg.rewards = [RewardEntry(name="brightness")]
    return cfg


def test_objective_choice_comes_from_the_registry(squared_theta):
    cfg = valid_job()
    cfg.grpo.objective = "no_such_objective"
    with pytest.raises(ConfigError, match="clipped_surrogate"):
        validate(cfg, "decoder")
    cfg.grpo.objective = "test_squared_theta"
    validate(cfg, "decoder")
    with pytest.raises(ConfigError, match="does not train the ar stage"):
        validate(cfg, "ar")


def test_a_registered_loss_type_is_a_valid_choice():
    cfg = valid_job()
    cfg.grpo.loss_type = "test_sum"
    with pytest.raises(ConfigError, match="grpo.loss_type"):
        validate(cfg, "decoder")
    register_loss_type("test_sum")(lambda per_unit, mask, max_units: (per_unit * mask).sum())
    try:
        validate(cfg, "decoder")
    finally:
        LOSS_TYPES.unregister("test_sum")


def test_clipped_surrogate_is_the_default_for_both_stages():
    assert JobConfig(output_dir="x").grpo.objective == "clipped_surrogate"
    assert OBJECTIVES.get("clipped_surrogate") is ClippedSurrogate
    assert set(ClippedSurrogate.stages) == {"ar", "decoder"}
