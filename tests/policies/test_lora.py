"""MergedLoRA (policies/lora.py): inside, a peft LoRA model computes with W + ΔW through its base layers alone and
gives the adapter forward's outputs; after (also after an exception), every base weight has its exact bits back
and the adapters run again."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tandem.policies.lora import MergedLoRA


def lora_mlp(dtype=torch.float32, seed=0) -> torch.nn.Module:
    """A two-layer MLP with LoRA r4 on both linears, B random (as after training; peft starts B at zero)."""
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    for layer in MergedLoRA.layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    return model


def base_weights(model) -> list:
    return [layer.get_base_layer().weight.detach().clone() for layer in MergedLoRA.layers(model)]


def test_merged_forward_equals_adapter_forward_and_restores_bits():
    model, x = lora_mlp(), torch.randn(5, 16)
    with torch.no_grad():
        want = model(x)
        with model.disable_adapter():
            base_out = model(x)
    before = base_weights(model)
    merged = MergedLoRA()
    with merged(model):
        assert MergedLoRA.layers(model) == []  # adapters off: the base layers alone run
        with torch.no_grad():
            got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base_out).abs().max() > 1e-2  # the adapters matter here, so the merge did something
    assert all(torch.equal(a, b) for a, b in zip(base_weights(model), before))
    with torch.no_grad():
        assert torch.equal(model(x), want)  # adapters back on
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_bf16_weights_restored_exactly_where_subtracting_would_not():
    model = lora_mlp(torch.bfloat16)
    before = base_weights(model)
    merged = MergedLoRA()
    for _ in range(3):  # the saved copies are reused across calls
        with merged(model):
            pass
    assert all(torch.equal(a, b) for a, b in zip(base_weights(model), before))
    # what a merge followed by peft's subtraction leaves: not the original bits in bf16
    layer = MergedLoRA.layers(model)[0]
    w = layer.get_base_layer().weight.detach()
    delta = layer.get_delta_weight("default").to(w.dtype)
    assert not torch.equal((w + delta) - delta, w)


def test_exception_inside_restores_weights_and_adapters():
    model = lora_mlp()
    before = base_weights(model)
    with pytest.raises(RuntimeError, match="boom"):
        with MergedLoRA()(model):
            raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(base_weights(model), before))
    assert len(MergedLoRA.layers(model)) == 2


def test_disabled_adapters_and_plain_models_run_as_they_are():
    model, x = lora_mlp(), torch.randn(3, 16)
    with torch.no_grad(), model.disable_adapter():
        want = model(x)
        with MergedLoRA()(model):
            assert torch.equal(model(x), want)
    before = base_weights(model)
    with MergedLoRA(enabled=False)(model):  # switched off: the adapters run beside the untouched weights
        assert len(MergedLoRA.layers(model)) == 2
        assert all(torch.equal(a, b) for a, b in zip(base_weights(model), before))
    plain = torch.nn.Linear(4, 4)
    w = plain.weight.detach().clone()
    with MergedLoRA()(plain):
        pass
    assert torch.equal(plain.weight, w)
