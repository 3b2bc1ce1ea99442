"""lora_helpers.attention: causal multi-head attention and LoRA on chosen projections."""

import math

import pytest
import torch
from torch import nn

from lora_helpers.attention import (
    ATTENTION_TARGETS,
    MultiHeadAttention,
    add_lora_to_attention,
    attention_targets,
)
from lora_helpers.lora import count_parameters, lora_layers, mark_only_lora_as_trainable


def reference_attention(att: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Causal multi-head attention written out with an explicit mask and softmax."""
    b, t, _ = x.shape
    h, hd = att.num_heads, att.head_dim
    q, k, v = (
        p(x).view(b, t, h, hd).transpose(1, 2) for p in (att.W_query, att.W_key, att.W_value)
    )
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    context = scores.softmax(-1) @ v
    return att.out_proj(context.transpose(1, 2).reshape(b, t, att.d_out))


def test_output_shape_and_reference_values():
    torch.manual_seed(0)
    att = MultiHeadAttention(d_in=12, d_out=8, context_length=6, dropout=0.0, num_heads=2)
    x = torch.randn(3, 5, 12)
    y = att(x)
    assert y.shape == (3, 5, 8)
    torch.testing.assert_close(y, reference_attention(att, x))


def test_attention_is_causal():
    torch.manual_seed(0)
    att = MultiHeadAttention(8, 8, context_length=6, dropout=0.0, num_heads=2)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 8)  # change the last two tokens only
    y, y_changed = att(x), att(changed)
    torch.testing.assert_close(y[:, :4], y_changed[:, :4])
    assert not torch.allclose(y[:, 4:], y_changed[:, 4:])


def test_dropout_only_in_training():
    torch.manual_seed(0)
    att = MultiHeadAttention(8, 8, context_length=6, dropout=0.5, num_heads=2)
    x = torch.randn(2, 6, 8)
    assert not torch.allclose(att(x), att(x))
    att.eval()
    torch.testing.assert_close(att(x), reference_attention(att, x))


def test_qkv_bias_switch():
    assert MultiHeadAttention(8, 8, 4, 0.0, 2).W_query.bias is None
    assert MultiHeadAttention(8, 8, 4, 0.0, 2, qkv_bias=True).W_query.bias.shape == (8,)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"d_out \(10\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(8, 10, 4, 0.0, num_heads=4)
    att = MultiHeadAttention(8, 8, context_length=4, dropout=0.0, num_heads=2)
    with pytest.raises(ValueError, match="5 tokens exceed the context length 4; truncate"):
        att(torch.randn(1, 5, 8))


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("qv", ["W_query", "W_value"]),
        ("QKVO", ["W_query", "W_key", "W_value", "out_proj"]),
        (["o", "q"], ["out_proj", "W_query"]),
        ("vv", ["W_value"]),
    ],
)
def test_attention_targets(which, expected):
    assert attention_targets(which) == expected


@pytest.mark.parametrize("which", ["qx", "", [], "query"])
def test_attention_targets_rejects_unknown_letters(which):
    with pytest.raises(ValueError, match="use letters from 'qkvo'"):
        attention_targets(which)


class TwoLayers(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MultiHeadAttention(d, d, 8, 0.0, 4) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@pytest.mark.parametrize("which", ["q", "qv", "kv", "qkvo"])
def test_add_lora_to_attention_wraps_exactly_the_chosen_projections(which):
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(2, 8, 16)
    before = model(x)
    assert add_lora_to_attention(model, which, rank=2, alpha=4) is model
    wanted = {f"layers.{i}.{ATTENTION_TARGETS[w]}" for i in range(2) for w in which}
    assert {name for name, _ in lora_layers(model)} == wanted
    assert isinstance(model.head, nn.Linear)
    assert torch.equal(model(x), before)  # identity at initialisation

    mark_only_lora_as_trainable(model)
    # per layer and target: rank * (d_in + d_out) = 2 * (16 + 16)
    assert count_parameters(model).trainable == 2 * len(which) * 2 * 32


def test_add_lora_to_attention_passes_lora_options_on():
    model = add_lora_to_attention(TwoLayers(), "q", rank=4, alpha=8, rslora=True)
    layer = model.layers[0].W_query.lora
    assert layer.scaling == 8 / 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"num_heads": -1}, "num_heads must be a positive integer"),
        ({"d_out": 0}, "d_out must be a positive integer"),
        ({"context_length": 0}, "context_length must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
    ],
)
def test_construction_refuses_bad_sizes_and_dropout(kwargs, message):
    args = {"d_in": 64, "d_out": 64, "context_length": 8, "dropout": 0.0, "num_heads": 8}
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**{**args, **kwargs})


def test_forward_without_a_batch_dimension_names_the_fix():
    att = MultiHeadAttention(64, 64, 8, 0.0, num_heads=8)
    with pytest.raises(ValueError, match=r"\(batch, tokens, d_in\).*unsqueeze\(0\)"):
        att(torch.randn(8, 64))
