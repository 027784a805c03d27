"""The AR samplers' per-row draw (policies/ar_sampler.py): inverse-CDF sampling of the processed distribution with
one seeded uniform stream per row (pure math, no model)."""

import torch

from tandem.policies.ar_sampler import inverse_cdf, row_uniforms


def test_inverse_cdf_takes_the_token_whose_cdf_interval_holds_u():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])  # token 1 has probability 0 (suppressed, −inf score)
    scores = probs.log()
    cases = {0.0: 0, 0.19: 0, 0.21: 2, 0.69: 2, 0.71: 3, 0.999: 3, 1.0: 3}  # 1.0: u·F_V == F_V, the guard's case
    for u, token in cases.items():
        assert inverse_cdf(scores, torch.tensor([u], dtype=torch.float64)).item() == token, u
    last_suppressed = torch.tensor([[0.2, 0.8, 0.0]]).log()  # the guard takes the last token of positive mass
    assert inverse_cdf(last_suppressed, torch.tensor([1.0], dtype=torch.float64)).item() == 1


def test_inverse_cdf_samples_the_distribution():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 12, generator=g)
    scores[0, 3] = float("-inf")
    n = 40000
    u = torch.rand(n, dtype=torch.float64, generator=g)
    tokens = inverse_cdf(scores.expand(n, -1), u)
    freq = torch.bincount(tokens, minlength=12).double() / n
    p = torch.softmax(scores[0].double(), -1)
    assert freq[3] == 0
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_row_uniforms_depend_on_the_row_seed_only():
    batch = row_uniforms([5, 9, 5], 7, torch.device("cpu"))
    assert batch.shape == (3, 7) and batch.dtype == torch.float64
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(row_uniforms([9], 7, torch.device("cpu"))[0], batch[1])
