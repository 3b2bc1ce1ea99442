"""Adapters on half-precision bases train and merge in float32 (as PEFT does), not in bf16/fp16.

A bf16 adapter loses the small updates it is made of, and a merge that adds a bf16 update
to a bf16 weight rounds twice. Here A, B (and DoRA's m) are float32; inputs are cast to
float32 for the update and the result back; a merge sums in float32 and rounds once.
"""

import copy

import pytest
import torch
from torch import nn

from lora_helpers.dora import LinearWithDoRA
from lora_helpers.lora import LinearWithLoRA, adapter_dtype
from lora_helpers.quant import QuantizedLinear, QuantizedLinearWithLoRA

HALF = [torch.bfloat16, torch.float16]


def trained(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give B (and m) values as training would: a small, non-zero update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora.B.copy_(0.01 * torch.randn(layer.lora.B.shape, generator=g))
        if hasattr(layer, "m"):
            layer.m.mul_(1 + 0.01 * torch.randn(layer.m.shape, generator=g))
    return layer


def base(dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 32).to(dtype)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32, torch.float64])
def test_the_adapter_dtype_is_float32_on_half_precision_and_the_base_dtype_otherwise(dtype):
    expected = torch.float32 if dtype in HALF else dtype
    assert adapter_dtype(dtype) == expected
    for layer in (LinearWithLoRA(base(dtype), 4, 8), LinearWithDoRA(base(dtype), 4, 8)):
        assert layer.lora.A.dtype == layer.lora.B.dtype == expected
        assert layer.linear.weight.dtype == dtype  # the base stays as it is
    assert LinearWithDoRA(base(dtype), 4, 8).m.dtype == expected


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", [LinearWithLoRA, LinearWithDoRA])
def test_a_half_precision_layer_runs_in_its_dtype_and_its_update_trains(kind, dtype):
    layer = kind(base(dtype), 4, 8)
    x = torch.randn(3, 64).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert layer.lora.B.grad is not None
    assert layer.lora.B.grad.dtype == torch.float32
    assert layer.lora.B.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", HALF)
def test_a_merge_on_a_half_precision_base_rounds_once(dtype):
    layer = trained(LinearWithLoRA(base(dtype), 8, 16))
    w = layer.linear.weight.detach().double()
    reference = w + layer.lora.delta_weight().detach().double()  # exact, in float64
    best_possible = (reference.to(dtype).double() - reference).abs()  # a single rounding
    layer.merge()
    error = (layer.linear.weight.double() - reference).abs()
    assert error.max() <= best_possible.max() * 1.001
    assert error.mean() <= best_possible.mean() * 1.001
    layer.unmerge()
    assert (layer.linear.weight.double() - w).abs().max() <= 2.001 * best_possible.max()


@pytest.mark.parametrize("dtype", HALF)
def test_small_updates_survive_on_a_half_precision_base(dtype):
    """One Adam step moves every entry by about lr. At lr 1e-5 that is below the spacing of
    bf16/fp16 numbers near most of A's values: a half-precision A would lose most steps."""
    layer = trained(LinearWithLoRA(base(dtype), 4, 8))
    before = layer.lora.A.detach().clone()
    optimizer = torch.optim.Adam(layer.lora.parameters(), lr=1e-5)
    layer(torch.randn(8, 64).to(dtype)).float().square().mean().backward()
    optimizer.step()
    moved = layer.lora.A.detach() != before
    assert moved.float().mean() > 0.9
    rounded_back = (before + (layer.lora.A.detach() - before)).to(dtype) == before.to(dtype)
    assert rounded_back.float().mean() > 0.5  # a half-precision A would have lost most steps


@pytest.mark.parametrize("dtype", HALF)
def test_merged_dora_on_a_half_precision_base_matches_the_float32_computation(dtype):
    layer = trained(LinearWithDoRA(base(dtype), 4, 8))
    x = torch.randn(5, 64)
    with torch.no_grad():
        exact = nn.functional.linear(x, layer.adapted_weight().float(), layer.linear.bias.float())
        layer.merge()
        merged = layer(x.to(dtype)).float()
    torch.testing.assert_close(merged, exact, rtol=2e-2, atol=2e-2)


def test_lora_on_a_quantized_half_precision_base_keeps_float32_factors():
    quantized = QuantizedLinear(base(torch.bfloat16))
    layer = QuantizedLinearWithLoRA(quantized, 4, 8)
    assert layer.lora.A.dtype == torch.float32
    assert layer(torch.randn(2, 64).to(torch.bfloat16)).dtype == torch.bfloat16


def test_a_merge_on_a_bf16_base_is_at_least_as_close_to_float64_as_peft():
    """PEFT keeps the factors in float32 too; our merge must be no further from the exact
    float64 weight than PEFT's merge_and_unload on the same bf16 base and factors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base_model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    ours = trained(LinearWithLoRA(copy.deepcopy(base_model[0]), 8, 16))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"])
    theirs = peft.get_peft_model(copy.deepcopy(base_model), config)
    layer = theirs.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # as ours
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora.A.T)
        layer.lora_B["default"].weight.copy_(ours.lora.B.T)
    exact = ours.linear.weight.double() + ours.lora.delta_weight().detach().double()
    merged_by_peft = theirs.merge_and_unload()[0].weight
    ours.merge()
    our_error = (ours.linear.weight.double() - exact).abs()
    peft_error = (merged_by_peft.double() - exact).abs()
    assert our_error.max() <= peft_error.max()
    assert our_error.mean() <= peft_error.mean()
