"""Data parallel on CPU (ddp and fsdp, gloo): 2 processes give the same update and sample the same rollout as one
process on the same data."""

import json
import sys

import pytest
import torch
from tests.dist_launch import run, torchrun
from safetensors import safe_open
from safetensors.torch import load_file


pytestmark = pytest.mark.slow  # multi-process runs


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["metrics"])


CASES = ["decoder-full-ddp", "decoder-full-fsdp", "decoder-lora-fsdp",  # full fine-tuning and LoRA (mixed requires_grad)
         "ar-full-fsdp", "ar-lora-fsdp"]


@pytest.fixture(scope="module")
def launches(tiny_model_path, tmp_path_factory):
    """tests/dist_cases.py run once in one process (out/one) and once in two (out/two): every update case (one
    process runs STAGE-TUNING-ddp only: nothing to shard) and a rollout of each stage."""
    out = tmp_path_factory.mktemp("dist_cases")
    (out / "one").mkdir(), (out / "two").mkdir()
    rollouts = ["rollout:decoder", "rollout:ar"]
    one = sorted({"step:" + case.rsplit("-", 1)[0] + "-ddp" for case in CASES})
    run([sys.executable, "tests/dist_cases.py", str(tiny_model_path), str(out / "one"), *one, *rollouts])
    run(torchrun("tests/dist_cases.py", str(tiny_model_path), str(out / "two"), *[f"step:{c}" for c in CASES], *rollouts))
    return out


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_process_on_the_same_data(launches, case):
    one, m1 = read(launches / "one" / f"step-{case.rsplit('-', 1)[0]}-ddp.safetensors")
    two, m2 = read(launches / "two" / f"step-{case}.safetensors")
    assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)  # whole tensors, not shards
    # weights after one SGD step (lr 1) differ by the difference of the averaged gradients: float noise only
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    assert diff < 1e-5 * scale, (diff, scale)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


# one process: [group 0 copies 0-3, group 1 copies 0-3]; two: [rank 0: g0 c0-1, g1 c0-1, rank 1: g0 c2-3, g1 c2-3]
ORDER = torch.tensor([(c // 2) * 4 + g * 2 + c % 2 for g in range(2) for c in range(4)])


@pytest.fixture(scope="module")
def rollouts(launches):
    """The rollouts of both stages from 1 process and from 2 (gloo), the latter in the former's row order:
    {stage: (one, two)}."""
    pairs = {}
    for stage in ("decoder", "ar"):
        one, two = (load_file(str(launches / n / f"rollout-{stage}.safetensors")) for n in ("one", "two"))
        pairs[stage] = one, {k: v[ORDER] for k, v in two.items()}
    return pairs


def test_two_processes_sample_the_rollout_of_one_process(rollouts):
    """Seeds per group and copy (tandem.core.seeds), not per process: copies of a prompt on different processes share
    the SDE window, the conditions' AR tokens and (same_noise_in_group) the starting noise, and the two processes
    together sample exactly what one process holding all 4 copies samples."""
    one, two = rollouts["decoder"]
    for key in ("timesteps", "full_tokens", "group_ids"):
        assert torch.equal(two[key], one[key]), key
    for key in ("latents", "next_latents", "old_log_probs", "advantages"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    assert len(set(one["timesteps"][:, 0].tolist())) == 1  # one window for the rollout call
    rows = one["latents"][:, 0].view(2, 4, -1)  # the same starting noise per group
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows), rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["next_latents"][0], one["next_latents"][1])  # copies still differ (their SDE noise)


def test_two_processes_sample_the_ar_rollout_of_one_process(rollouts):
    """The AR stage: each copy's tokens come from its own seed (rollout seed, group, copy) and its own stream
    (policies.ar_sampler.SeededDraws), the frozen decoder that renders them for the rewards from one seed per
    group; so the two processes sample exactly the tokens, log-probs and rewards of one process."""
    one, two = rollouts["ar"]
    for key in ("tokens", "decode_seeds", "group_ids"):
        assert torch.equal(two[key], one[key]), key
    for key in ("old_log_probs", "advantages"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    seeds = one["decode_seeds"].view(2, 4)
    assert (seeds == seeds[:, :1]).all() and seeds[0, 0] != seeds[1, 0]  # one decoder seed per group
    assert not torch.equal(one["tokens"][0], one["tokens"][1])  # the copies of a group still differ
