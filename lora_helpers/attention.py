"""Causal multi-head self-attention with separate query, key, value and output projections.

The projections are plain nn.Linear layers named as in "GPT-2 from scratch" code
(W_query, W_key, W_value, out_proj), so LoRA can be put on any subset of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import dropout_probability, positive_int
from .lora import replace_linear_with_lora

#: Short names for the four projections, as the LoRA paper writes them.
ATTENTION_TARGETS = {"q": "W_query", "k": "W_key", "v": "W_value", "o": "out_proj"}


class MultiHeadAttention(nn.Module):
    """Causal self-attention: x (batch, tokens, d_in) -> (batch, tokens, d_out).

    dtype: of the four projections' weights (default: torch's default dtype). Raises
    ValueError for sizes below 1, d_out not divisible by num_heads, or dropout outside [0, 1).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = {"d_in": d_in, "d_out": d_out, "context_length": context_length}
        for name, value in {**sizes, "num_heads": num_heads}.items():
            positive_int(name, value)
        dropout_probability(dropout, "dropout")
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.context_length, self.dropout = context_length, dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias, dtype=dtype)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias, dtype=dtype)
        self.out_proj = nn.Linear(d_out, d_out, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(
                f"Expected x of shape (batch, tokens, d_in), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0)."
            )
        b, t, _ = x.shape
        if t > self.context_length:
            raise ValueError(
                f"{t} tokens exceed the context length {self.context_length}; truncate the input."
            )
        # (b, t, d_out) -> (b, heads, t, head_dim)
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.W_query, self.W_key, self.W_value)
        )
        # softmax(q k^T / sqrt(head_dim) + causal mask) v, in one fused kernel where available
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


def attention_targets(which: str | Iterable[str]) -> list[str]:
    """Module names for LoRA targets given as letters: "qv" -> ["W_query", "W_value"]."""
    letters = list(which.lower()) if isinstance(which, str) else [w.lower() for w in which]
    unknown = [w for w in letters if w not in ATTENTION_TARGETS]
    if unknown or not letters:
        raise ValueError(
            f"Unknown attention target(s) {unknown or which!r}; use letters from 'qkvo' "
            "(q=W_query, k=W_key, v=W_value, o=out_proj), e.g. 'qv' or 'qkvo'."
        )
    return [ATTENTION_TARGETS[w] for w in dict.fromkeys(letters)]


def add_lora_to_attention(
    model: nn.Module, which: str | Iterable[str], rank: int, alpha: float, **lora_kwargs
) -> nn.Module:
    """Put LoRA on the chosen projections ("q", "k", "v", "o") of every attention module; returns `model`."""
    return replace_linear_with_lora(
        model, rank, alpha, target_modules=attention_targets(which), **lora_kwargs
    )
