"""EMA of the trained weights: flow_grpo's warm-up and update interval, and its checkpointed step count."""

import pytest
import torch

from tandem.policies.ema import EMA


def flow_grpo_ema(thetas, decay, interval, warmup):
    """flow_grpo's EMAModuleWrapper.step written out: at optimizer step t, if (t + 1) % interval == 0,
    ema += (1 - d_t)(theta - ema) with d_t = min((1 + t) / (10 + t), decay)."""
    ema = thetas[0].clone()
    for t, theta in enumerate(thetas[1:]):
        d = min((1 + t) / (10 + t), decay) if warmup else decay
        if (t + 1) % interval == 0:
            ema = ema + (1 - d) * (theta - ema)
    return ema


@pytest.mark.parametrize("warmup,interval", [(True, 1), (True, 3), (False, 2), (False, 1)])
def test_ema_follows_flow_grpo_warmup_and_interval(warmup, interval):
    thetas = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    param = torch.nn.Parameter(thetas[0].clone())
    ema = EMA([("w", param)], decay=0.9, warmup=warmup, interval=interval)
    for theta in thetas[1:]:
        param.data.copy_(theta)
        ema.update([param])
    torch.testing.assert_close(ema.shadow[0], flow_grpo_ema(thetas, 0.9, interval, warmup), rtol=1e-6, atol=1e-7)

    resumed = EMA([("w", param)], decay=0.9, warmup=warmup, interval=interval)  # a checkpoint restores the step count
    resumed.load_state_dict(ema.state_dict(), steps=ema.steps)
    for e in (ema, resumed):
        e.update([param])
    assert resumed.steps == ema.steps == 12 and torch.equal(resumed.shadow[0], ema.shadow[0])


def test_warmup_decay_schedule():
    ema = EMA([], decay=0.95, warmup=True)
    assert [ema.current_decay(t) for t in (0, 1, 10, 1000)] == [pytest.approx(0.1), pytest.approx(2 / 11),
                                                                pytest.approx(11 / 20), 0.95]
    assert EMA([], decay=0.95).current_decay(0) == 0.95
