"""Simple rewards: the exact formulas, and that a tiny parametric image generator can climb them."""

import numpy as np
import pytest

from tandem.rewards.simple import brightness, color, jpeg_compressibility


def flat(rgb, n=1, size=16):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (n, size, size, 3)).copy()


def test_formulas():
    assert brightness(flat([255, 255, 255]), [""], [{}], target=0.25)[0] == pytest.approx(-0.75)
    assert brightness(flat([0, 255, 0]), [""], [{}], target=0.0)[0] == pytest.approx(-0.587)
    assert color(flat([255, 0, 0]), [""], [{}], rgb=[255, 0, 0])[0] == pytest.approx(0.0)
    assert color(flat([0, 0, 0]), [""], [{}], rgb=[255, 255, 255])[0] == pytest.approx(-1.0)
    noisy = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    assert jpeg_compressibility(flat([90, 90, 90], size=64), [""], [{}])[0] > jpeg_compressibility(noisy, [""], [{}])[0]
    with pytest.raises(ValueError, match="args.rgb must be three numbers"):
        color(flat([0, 0, 0]), [""], [{}], rgb=[1, 2])


@pytest.mark.parametrize(
    "reward, kwargs",
    [(brightness, {"target": 0.8}), (color, {"rgb": [30, 200, 90]}), (jpeg_compressibility, {})],
    ids=["brightness", "color", "jpeg"],
)
def test_learnable_by_a_tiny_generator(reward, kwargs):
    """Generator: image = sigmoid(theta_colour) * 255 + sigmoid(theta_noise) * N(0, 60) noise. Antithetic
    evolution strategies on theta must cover at least half the way from the start to the best reward (0, or
    for JPEG size the size of a flat image: the header) within 40 steps."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(16, 16, 3)) * 60

    def render(theta):
        sig = 1 / (1 + np.exp(-theta))
        return np.clip(sig[:3] * 255 + sig[3] * noise, 0, 255).astype(np.uint8)[None]

    def value(theta):
        return float(reward(render(theta), [""], [{}], **kwargs)[0])

    theta = np.array([-1.0, -1.0, -1.0, 1.0])
    start = value(theta)
    for _ in range(40):
        eps = rng.normal(size=(8, 4))
        grad = np.mean([(value(theta + 0.3 * e) - value(theta - 0.3 * e)) / 0.6 * e for e in eps], axis=0)
        theta = theta + 10.0 * grad
    best = reward(flat([128, 128, 128]), [""], [{}])[0] if reward is jpeg_compressibility else 0.0
    assert value(theta) - start > 0.5 * (best - start), (start, value(theta), best)
