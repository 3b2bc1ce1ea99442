"""Figures that LoRA write-ups quote, rebuilt so that notebook 04 can recompute them.

- A from-scratch LoRA tutorial's code for Hugging Face's GPT-2 (its "29,346,440 trainable
  parameters, 23.58 %"): its LoRA wrapper, the attention module it puts in place of GPT-2's,
  and its apply function, rebuilt with their defects so that they can be shown.
- "A 7B model at rank 8 trains about 7 million parameters": Llama-2-7B's shapes, counted on
  the meta device.

transformers is imported inside the functions that need it, not at import time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .lora import ParameterCount, count_parameters, freeze, replace_linear_with_lora


class TutorialLoRALinear(nn.Module):
    """The tutorial's wrapper: x (..., in) -> linear(x) + alpha * x @ A @ B, shape (..., out).

    A is drawn from a standard normal, B starts at zero, the scaling is alpha alone (not
    alpha / rank), and the wrapped linear is NOT frozen.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear, self.alpha = linear, alpha
        self.A = nn.Parameter(torch.randn(linear.in_features, rank))
        self.B = nn.Parameter(torch.zeros(rank, linear.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.alpha * (x @ self.A @ self.B)


class TutorialAttention(nn.Module):
    """What the tutorial puts in place of each GPT-2 attention: x (b, t, d) -> (b, t, d).

    Four NEW nn.Linear(d, d), each wrapped in TutorialLoRALinear: the pretrained attention
    weights are gone. softmax(Q K^T / sqrt(d_h)) V with NO causal mask, so every position
    also reads the tokens after it. forward(x) takes nothing else, so a GPT-2 block, which
    passes a cache and an attention mask by keyword, cannot call it (TypeError).
    """

    def __init__(self, d: int, num_heads: int, rank: int, alpha: float) -> None:
        super().__init__()
        if d % num_heads:
            raise ValueError(f"d ({d}) must be divisible by num_heads ({num_heads}).")
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.W_q, self.W_k, self.W_v, self.W_o = (
            TutorialLoRALinear(nn.Linear(d, d), rank, alpha) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.W_q, self.W_k, self.W_v)
        )
        weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)  # no mask
        return self.W_o((weights @ v).transpose(1, 2).reshape(b, t, d))


def apply_lora_like_the_tutorial(model: nn.Module, rank: int, alpha: float) -> None:
    """Change a Hugging Face GPT-2 in place as the tutorial does; returns None, as its function does.

    Every nn.Linear (in GPT-2: only lm_head, the rest are Conv1D) gets a TutorialLoRALinear;
    every GPT2Attention is replaced by a fresh TutorialAttention, pretrained weights discarded.
    """
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if isinstance(module, nn.Linear):
            new = TutorialLoRALinear(module, rank, alpha)
        elif isinstance(module, GPT2Attention):
            new = TutorialAttention(module.embed_dim, module.num_heads, rank, alpha)
        else:
            continue
        setattr(model.get_submodule(parent), child, new)


#: Llama-2-7B's shapes (Touvron et al., 2023, and its config.json): 32 blocks of width 4096,
#: an MLP of width 11008 (gate, up and down projections), 32 heads, a 32,000-token vocabulary.
LLAMA_2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}

#: The linear layers of a Llama block, by the names transformers gives them.
LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def llama_lora_count(targets: Iterable[str] | None, rank: int = 8) -> ParameterCount:
    """Parameters of a frozen Llama-2-7B (on the meta device: no memory) with LoRA on `targets`.

    targets: layer names as in LLAMA_ATTENTION and LLAMA_MLP (a single str is one name, as
    in replace_linear_with_lora), or None for no LoRA at all. Every targeted layer adds
    rank * (in + out) trainable parameters.
    """
    import transformers

    if isinstance(targets, str):
        targets = [targets]

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_2_7B))
    if targets is not None:
        replace_linear_with_lora(freeze(model), rank, 2 * rank, target_modules=list(targets))
    return count_parameters(model)
