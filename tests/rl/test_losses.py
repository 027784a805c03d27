"""Pure-math checks of the clipped-surrogate loss, its reductions and the k3 KL (rl/losses.py)."""

import math

import pytest
import torch

from tandem.policies.kl import k3_kl
from tandem.rl.losses import LOSS_TYPES, get_loss_type, policy_loss, register_loss_type

EPS = dict(epsilon_low=0.2, epsilon_high=0.28)


def _batch(seed=0, B=4, U=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, U, generator=g) * 3
    logp = old + 0.5 * torch.randn(B, U, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, U)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return logp, old, adv, mask


def _hand_per_unit(logp, old, adv, eps_low=0.2, eps_high=0.28):
    """Element-by-element −min(rA, clip(r)A) in python floats."""
    out = []
    for b in range(logp.shape[0]):
        row = []
        for u in range(logp.shape[1]):
            r = math.exp(logp[b, u].item() - old[b, u].item())
            a = adv[b].item()
            row.append(-min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a))
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_ratio_is_one_and_loss_is_minus_weighted_advantage(loss_type):
    _, old, adv, _ = _batch()
    mask = torch.ones_like(old)
    loss, m = policy_loss(old.clone(), old, adv, mask, loss_type=loss_type, **EPS)
    assert m["ratio/mean"] == m["ratio/min"] == m["ratio/max"] == 1.0
    assert m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0 and m["kl"] == 0.0
    torch.testing.assert_close(loss, -adv.mean())
    assert m["loss"] == pytest.approx(loss.item())


def test_each_reduction_against_hand_computation():
    logp, old, adv, mask = _batch()
    per = _hand_per_unit(logp, old, adv)
    B, U = per.shape
    rows = [sum(per[b, u] * mask[b, u] for u in range(U)) / sum(mask[b]) for b in range(B)]
    total = sum(per[b, u] * mask[b, u] for b in range(B) for u in range(U))
    expected = {
        "grpo": sum(rows) / B,
        "bnpo": total / mask.sum(),
        "dapo": total / mask.sum(),
        "dr_grpo": total / (B * U),
    }
    for loss_type, value in expected.items():
        loss, _ = policy_loss(logp, old, adv, mask, loss_type=loss_type, **EPS)
        torch.testing.assert_close(loss, torch.as_tensor(value, dtype=torch.float32), msg=loss_type)
    loss, _ = policy_loss(logp, old, adv, mask, loss_type="dr_grpo", max_units=10, **EPS)
    torch.testing.assert_close(loss, torch.as_tensor(total / (B * 10), dtype=torch.float32))


def test_float_mask_weights_and_the_kl_term():
    logp, old, adv, mask = _batch()
    weights = mask * torch.tensor([0.5, 0.5, 1.0, 1.0, 2.0, 2.0])
    kl = torch.rand_like(logp)
    beta = 0.04
    per = _hand_per_unit(logp, old, adv) + beta * kl
    loss, m = policy_loss(logp, old, adv, weights, loss_type="bnpo", kl=kl, beta=beta, **EPS)
    torch.testing.assert_close(loss, (per * weights).sum() / weights.sum())
    loss, _ = policy_loss(logp, old, adv, weights, loss_type="grpo", kl=kl, beta=beta, **EPS)
    torch.testing.assert_close(loss, ((per * weights).sum(-1) / weights.sum(-1)).mean())
    assert m["kl"] == pytest.approx(kl[mask > 0].mean().item())


def test_clipfrac_and_ratio_stats_on_a_hand_built_case():
    # eps_low = 0.2, eps_high = 0.28 → the clip is active below 0.8 when A < 0 and above 1.28 when A > 0
    ratios = torch.tensor([[0.5, 1.5, 1.0, 1.29, 1.25], [0.7, 1.5, 0.79, 9.0, 0.81]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0]])
    _, m = policy_loss(ratios.log(), torch.zeros(2, 5), adv, mask, loss_type="grpo", **EPS)
    # row 0 (A > 0): 1.5 and 1.29 are clipped, 1.25 is not; row 1 (A < 0): 0.7 and 0.79; 9.0 is masked out
    active = [0.5, 1.5, 1.0, 1.29, 1.25, 0.7, 1.5, 0.79, 0.81]
    assert m["clipfrac"] == pytest.approx(4 / 9)
    assert m["ratio/min"] == pytest.approx(0.5)
    assert m["ratio/max"] == pytest.approx(1.5)
    assert m["ratio/mean"] == pytest.approx(sum(active) / 9, rel=1e-6)
    assert m["approx_kl"] == pytest.approx(sum((r - 1) - math.log(r) for r in active) / 9, rel=1e-5)


def test_masked_units_do_not_matter():
    logp, old, adv, mask = _batch()
    poisoned = logp.clone()
    poisoned[mask == 0] = 50.0  # huge ratio where masked
    for loss_type in LOSS_TYPES.names():
        a, ma = policy_loss(logp, old, adv, mask, loss_type=loss_type, **EPS)
        b, mb = policy_loss(poisoned, old, adv, mask, loss_type=loss_type, **EPS)
        torch.testing.assert_close(a, b)
        assert ma == mb
    grad_logp = poisoned.clone().requires_grad_(True)
    policy_loss(grad_logp, old, adv, mask, loss_type="grpo", **EPS)[0].backward()
    assert torch.equal(grad_logp.grad[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_all_masked_is_zero_loss_and_nan_stats():
    logp, old, adv, _ = _batch()
    loss, m = policy_loss(logp, old, adv, torch.zeros_like(logp), loss_type="grpo", **EPS)
    assert loss.item() == 0.0
    assert math.isnan(m["ratio/mean"]) and math.isnan(m["clipfrac"])


def test_gradient_flows_to_logp_only():
    logp, old, adv, mask = _batch()
    logp, old, adv = (t.clone().requires_grad_(True) for t in (logp, old, adv))
    loss, _ = policy_loss(logp, old, adv, mask, loss_type="grpo", **EPS)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and adv.grad is None


def test_k3_kl():
    logp, ref, _, _ = _batch()
    assert torch.equal(k3_kl(logp, logp.clone()), torch.zeros_like(logp))
    kl = k3_kl(logp, ref)
    assert (kl > 0).all()
    d = (ref - logp).double()
    torch.testing.assert_close(kl.double(), d.exp() - d - 1, rtol=1e-5, atol=1e-6)


def test_unknown_loss_type_lists_valid_names():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="'gspo'.*bnpo, dapo, dr_grpo, grpo"):
        policy_loss(logp, old, adv, mask, loss_type="gspo", **EPS)
    with pytest.raises(ValueError, match="bnpo, dapo, dr_grpo, grpo"):
        get_loss_type("GRPO")


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register_loss_type("grpo")(lambda per_unit, mask, max_units: per_unit.sum())
    assert LOSS_TYPES.names() == ["bnpo", "dapo", "dr_grpo", "grpo"]


def test_bad_shapes_and_missing_kl_are_errors():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=r"advantages \(4, 1\)"):
        policy_loss(logp, old, adv[:, None], mask, loss_type="grpo", **EPS)
    with pytest.raises(ValueError, match="beta=0.1 needs kl"):
        policy_loss(logp, old, adv, mask, loss_type="grpo", beta=0.1, **EPS)
    with pytest.raises(ValueError, match=r"got \(4, 5\)"):
        policy_loss(logp, old, adv, mask, loss_type="grpo", kl=logp[:, :5], **EPS)
