"""lora_helpers.quant: levels, packing, the error bound, memory accounting, QLoRA layers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_helpers import quant
from lora_helpers.dora import replace_linear_with_dora
from lora_helpers.lora import count_parameters, freeze, replace_linear_with_lora

# The NF4 table as published with QLoRA (and hard-coded in bitsandbytes).
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def within_bound(q: quant.Quantized4bit, weight: torch.Tensor) -> bool:
    """|w - dequantised w| <= bound, allowing float32 rounding (a few ulps of the block's absmax)."""
    error = (quant.dequantize_4bit(q) - weight).abs()
    slack = 1e-6 * q.absmax.repeat_interleave(q.block_size).view(weight.shape)
    return bool((error <= q.error_bound() + slack).all())


def test_nf4_levels_match_the_qlora_table():
    levels = quant.nf4_levels()
    assert levels.shape == (16,)
    assert torch.allclose(levels, torch.tensor(QLORA_NF4), atol=1e-6)
    assert levels[7] == 0
    assert levels[0] == -1
    assert levels[-1] == 1


def test_int4_levels_are_sevenths():
    assert torch.equal(quant.int4_levels() * 7, torch.arange(-7.0, 8.0))


def test_max_error_fraction_is_half_the_widest_gap():
    assert quant.max_error_fraction("int4") == pytest.approx(1 / 14, abs=1e-7)
    assert quant.max_error_fraction("nf4") == pytest.approx((1 - 0.6961928009986877) / 2, abs=1e-6)


def test_pack_a_hand_computed_case():
    packed = quant.pack_4bit(torch.tensor([3, 12, 15, 0]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0xC3, 0x0F]  # low 4 bits first code, high 4 bits second
    assert quant.unpack_4bit(packed).tolist() == [3, 12, 15, 0]


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(0))
    packed = quant.pack_4bit(codes)
    assert packed.numel() == 500
    assert torch.equal(quant.unpack_4bit(packed), codes.to(torch.uint8))


def test_pack_refuses_odd_lengths_and_codes_above_15():
    with pytest.raises(ValueError, match="even number of codes"):
        quant.pack_4bit(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"0\.\.15"):
        quant.pack_4bit(torch.tensor([1, 16]))
    with pytest.raises(ValueError, match="flat uint8"):
        quant.unpack_4bit(torch.tensor([1, 2]))


def test_quantise_a_hand_computed_int4_block():
    block = torch.tensor([0.7, -0.315, 0.1, 0.0])
    q = quant.quantize_4bit(block, block_size=4, scheme="int4")
    assert q.absmax.tolist() == pytest.approx([0.7])
    # w / absmax = 1, -0.45, 1/7, 0 -> nearest sevenths 7/7, -3/7, 1/7, 0 -> codes k + 7
    assert quant.unpack_4bit(q.packed).tolist() == [14, 4, 8, 7]
    assert torch.allclose(quant.dequantize_4bit(q), torch.tensor([0.7, -0.3, 0.1, 0.0]))


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("block_size", [2, 16, 64, 256])
def test_roundtrip_error_within_the_bound_on_random_weights(scheme, block_size):
    g = torch.Generator().manual_seed(block_size)
    gaussian = torch.randn(64, 64, generator=g)
    heavy_tailed = torch.randn(64, 64, generator=g) ** 3
    for weight in (gaussian, heavy_tailed):
        q = quant.quantize_4bit(weight, block_size, scheme)
        assert within_bound(q, weight)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_the_bound_is_nearly_reached(scheme):
    # values spread evenly in [-1, 1] fall in the widest gap too: the bound is not loose
    weight = torch.linspace(-1, 1, 4096)
    q = quant.quantize_4bit(weight, 4096, scheme)
    error = (quant.dequantize_4bit(q) - weight).abs().max()
    assert error > 0.99 * q.error_bound().max()


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_adversarial_blocks(scheme):
    zeros = torch.zeros(2, 64)
    q = quant.quantize_4bit(zeros, 64, scheme)
    assert torch.equal(q.absmax, torch.zeros(2))
    assert torch.equal(quant.dequantize_4bit(q), zeros)

    outlier = torch.full((64,), 0.01)
    outlier[5] = -100.0
    q = quant.quantize_4bit(outlier, 64, scheme)
    restored = quant.dequantize_4bit(q)
    assert restored[5] == -100.0  # the absmax value itself is a level, exactly
    assert within_bound(q, outlier)
    assert torch.equal(restored[torch.arange(64) != 5], torch.zeros(63))  # swamped by the outlier


@pytest.mark.parametrize(("shape", "block_size"), [((64, 32), 64), ((768, 3072), 64), ((10, 6), 4)])
def test_memory_accounting_is_exact(shape, block_size):
    weight = torch.randn(shape)
    q = quant.quantize_4bit(weight, block_size, "nf4")
    n = weight.numel()
    assert q.packed.dtype == torch.uint8
    assert q.packed.numel() == n // 2
    assert q.absmax.dtype == torch.float32
    assert q.absmax.numel() == n // block_size
    assert q.nbytes == n // 2 + 4 * (n // block_size)
    assert quant.dequantize_4bit(q).shape == weight.shape
    assert q.error_bound().shape == weight.shape


def test_dequantize_keeps_blocks_row_major():
    weight = torch.cat([torch.full((1, 4), 1.0), torch.full((1, 4), 8.0)])  # one block per row
    q = quant.quantize_4bit(weight, 4, "int4")
    assert q.absmax.tolist() == [1.0, 8.0]
    assert torch.equal(quant.dequantize_4bit(q), weight)


@pytest.mark.parametrize(
    ("weight", "kwargs", "message"),
    [
        (torch.zeros(100), {"block_size": 64}, "not a multiple of block_size=64"),
        (torch.zeros(64), {"block_size": 3}, "must be even"),
        (torch.zeros(64), {"block_size": 0}, "integer >= 2"),
        (torch.zeros(64), {"block_size": True}, "integer >= 2"),
        (torch.zeros(64), {"scheme": "fp4"}, "Unknown quantisation scheme 'fp4'"),
        (torch.tensor([1.0, float("nan")]), {"block_size": 2}, "inf or NaN"),
    ],
)
def test_bad_input_is_refused(weight, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize_4bit(weight, **kwargs)


def test_quantized_linear_computes_with_the_dequantised_weight():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    qlinear = quant.QuantizedLinear(linear, block_size=64, scheme="nf4")
    x = torch.randn(4, 32)
    expected = F.linear(
        x, quant.dequantize_4bit(quant.quantize_4bit(linear.weight, 64)), linear.bias
    )
    assert torch.equal(qlinear(x), expected)
    assert count_parameters(qlinear).total == 0  # codes, scales and bias are buffers
    assert set(qlinear.state_dict()) == {"packed", "absmax", "bias"}
    assert qlinear.quantized.nbytes == 32 * 16 // 2 + 4 * (32 * 16 // 64)


def test_quantized_linear_refuses_other_layers():
    with pytest.raises(TypeError, match=r"quantises an nn\.Linear"):
        quant.QuantizedLinear(nn.Conv1d(4, 4, 1))


def test_qlora_layer_starts_as_the_quantised_layer_and_trains_only_a_and_b():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    quant.quantize_linears(model)
    x = torch.randn(6, 32)
    before = model(x)
    quant.add_lora_to_quantized(model, rank=4, alpha=8)
    assert torch.equal(model(x), before)
    counts = count_parameters(model)
    assert counts.trainable == counts.total == 4 * (32 + 32) + 4 * (32 + 8)
    with torch.no_grad():
        model[0].lora.B.normal_()
    model(x).sum().backward()
    assert model[0].lora.A.grad.abs().sum() > 0
    assert quant.quantized_bytes(model) == (32 * 32 + 32 * 8) // 2 + 4 * (32 * 32 + 32 * 8) // 64


def test_merged_linear_gives_the_same_outputs_in_float():
    torch.manual_seed(0)
    layer = quant.QuantizedLinearWithLoRA(quant.QuantizedLinear(nn.Linear(32, 16)), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora.B.normal_()
    merged = layer.merged_linear()
    assert isinstance(merged, nn.Linear)
    x = torch.randn(5, 32)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)


def test_qlora_refuses_a_float_layer_and_a_model_without_quantised_layers():
    with pytest.raises(TypeError, match=r"use lora_helpers\.lora\.LinearWithLoRA"):
        quant.QuantizedLinearWithLoRA(nn.Linear(4, 4), rank=1, alpha=1)
    with pytest.raises(ValueError, match="call quantize_linears"):
        quant.add_lora_to_quantized(nn.Sequential(nn.Linear(4, 4)), rank=1, alpha=1)
    model = quant.add_lora_to_quantized(
        quant.quantize_linears(nn.Sequential(nn.Linear(4, 4)), 16), 1, 1
    )
    with pytest.raises(ValueError, match="no unwrapped QuantizedLinear: each one already"):
        quant.add_lora_to_quantized(model, rank=1, alpha=1)  # no double wrapping
    with pytest.raises(ValueError, match=r"no nn\.Linear layer to quantise"):
        quant.quantize_linears(nn.ReLU())
    with pytest.raises(ValueError, match=r"use QuantizedLinear\(linear\)"):
        quant.quantize_linears(nn.Linear(64, 64))


@pytest.mark.skipif(quant.bitsandbytes_4bit_available(), reason="bitsandbytes and CUDA present")
def test_bitsandbytes_path_says_what_it_needs():
    assert quant.bitsandbytes_4bit_available() is False
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        quant.bitsandbytes_nf4_weight(torch.zeros(64))


@pytest.mark.skipif(not quant.bitsandbytes_4bit_available(), reason="needs CUDA and bitsandbytes")
def test_bitsandbytes_nf4_agrees_with_ours():
    weight = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    ours = quant.dequantize_4bit(quant.quantize_4bit(weight, 64, "nf4"))
    theirs = quant.bitsandbytes_nf4_weight(weight, 64)
    assert (ours == theirs).float().mean() > 0.99


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_quantising_under_an_adapter_is_refused_before_anything_changes(kind):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    add = replace_linear_with_lora if kind == "lora" else replace_linear_with_dora
    add(model, 2, 4, target_modules=["0"])
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"Layer '0' already carries a LinearWith(LoRA|DoRA)"):
        quant.quantize_linears(model)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before


@pytest.mark.parametrize("bad", ["block", "inf"])
def test_quantize_linears_changes_nothing_when_a_later_layer_fails(bad):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 2))
    if bad == "inf":
        with torch.no_grad():
            model[3].weight[0, 0] = math.inf
    kwargs = {"block_size": 1024} if bad == "block" else {}  # 64 divides the head's 64 weights
    match = "not a multiple of block_size" if bad == "block" else "inf or NaN"
    with pytest.raises(ValueError, match=rf"Layer '3': .*{match}"):
        quant.quantize_linears(model, **kwargs)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]


def test_wrong_types_get_errors_that_name_what_to_pass():
    with pytest.raises(TypeError, match=r"use QuantizedLinear\(layer\)"):
        quant.quantize_4bit(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"takes a Quantized4bit"):
        quant.dequantize_4bit(torch.zeros(64))
    q = quant.quantize_4bit(torch.zeros(64))
    with pytest.raises(TypeError, match=r"floating torch\.dtype such as torch\.float32"):
        quant.dequantize_4bit(q, "float32")
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        quant.dequantize_4bit(q, torch.int8)


@pytest.mark.parametrize("codes", [torch.tensor([3.7, 1.2]), torch.tensor([True, False]), [3, 1]])
def test_pack_refuses_anything_but_integer_codes(codes):
    with pytest.raises(TypeError, match=r"integer codes 0\.\.15"):
        quant.pack_4bit(codes)


def test_a_second_call_says_the_model_is_quantised_or_carries_lora_already():
    model = quant.quantize_linears(nn.Sequential(nn.Linear(8, 8)), 16)
    with pytest.raises(ValueError, match="is quantised already"):
        quant.quantize_linears(model)
    quant.add_lora_to_quantized(model, 1, 1)
    with pytest.raises(ValueError, match="each one already carries LoRA"):
        quant.add_lora_to_quantized(model, 1, 1)


def test_add_lora_to_quantized_freezes_nothing_so_freeze_first():
    model = nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 8))
    quant.quantize_linears(model, 16)
    unfrozen = quant.add_lora_to_quantized(copy.deepcopy(model), 1, 1)
    assert count_parameters(unfrozen).trainable == 4 * 8 + 16  # the embedding trains too
    frozen = quant.add_lora_to_quantized(freeze(model), 1, 1)
    assert count_parameters(frozen).trainable == 16
    assert "lora.freeze(module) first" in quant.add_lora_to_quantized.__doc__
