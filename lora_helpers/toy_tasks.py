"""Two small tasks that train in seconds on a CPU.

- Notebook 02: a frozen linear layer whose target differs from it by a low-rank change.
- Notebook 03: a one-layer attention model pretrained to copy the token `offset` places
  back, then adapted (with LoRA on its attention) to copy from another offset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters; add LoRA layers or unfreeze some weights first."
        )
    return params


class LowRankChangeTask(NamedTuple):
    base: nn.Linear  # the layer we start from (LinearWithLoRA freezes it)
    delta: torch.Tensor  # (out_dim, in_dim), the change of the target, rank `change_rank`
    x: torch.Tensor  # (n_samples, in_dim)
    y: torch.Tensor  # (n_samples, out_dim) = base(x) + x @ delta.T


def low_rank_change_task(
    in_dim: int = 64,
    out_dim: int = 64,
    change_rank: int = 2,
    *,
    n_samples: int = 512,
    seed: int = 0,
) -> LowRankChangeTask:
    """A random nn.Linear(in_dim, out_dim) and targets from its weight plus a rank-`change_rank` change."""
    if not 1 <= change_rank <= min(in_dim, out_dim):
        raise ValueError(
            f"change_rank must be from 1 to min(in_dim, out_dim) = {min(in_dim, out_dim)}, "
            f"got {change_rank}."
        )
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = nn.Linear(in_dim, out_dim)
    delta = torch.randn(out_dim, change_rank, generator=g) @ torch.randn(
        change_rank, in_dim, generator=g
    )
    delta /= math.sqrt(change_rank * in_dim)  # entries of x @ delta.T have variance ~1
    x = torch.randn(n_samples, in_dim, generator=g)
    with torch.no_grad():
        y = base(x) + x @ delta.T
    return LowRankChangeTask(base, delta, x, y)


def fit_regression(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 300, lr: float = 1e-2
) -> list[float]:
    """Full-batch Adam on the mean squared error of model(x) against y; returns the loss per step."""
    optimizer = torch.optim.Adam(_trainable(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class CopyModel(nn.Module):
    """Token and position embeddings, one causal attention layer, a linear read-out.

    idx (batch, tokens) of ints < vocab_size -> logits (batch, tokens, vocab_size).
    """

    def __init__(
        self, vocab_size: int = 16, d_model: int = 32, context_length: int = 12, num_heads: int = 2
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context_length, d_model)
        self.att = MultiHeadAttention(d_model, d_model, context_length, 0.0, num_heads)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.att(self.tok_emb(idx) + self.pos_emb(positions)))


def copy_batch(
    batch_size: int, offset: int, vocab_size: int, context_length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens (batch, tokens) and targets: the token `offset` places back, -100 where none."""
    if not 1 <= offset < context_length:
        raise ValueError(
            f"offset must be from 1 to context_length - 1 = {context_length - 1}, got {offset}."
        )
    idx = torch.randint(0, vocab_size, (batch_size, context_length), generator=generator)
    targets = torch.full_like(idx, -100)  # -100: ignored by cross_entropy
    targets[:, offset:] = idx[:, :-offset]
    return idx, targets


def _copy_loss(model: CopyModel, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)


def train_copy_task(
    model: CopyModel,
    offset: int,
    *,
    steps: int,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Adam on the trainable parameters to copy the token `offset` places back; loss per step."""
    optimizer = torch.optim.Adam(_trainable(model), lr=lr)
    vocab_size, context_length = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = _copy_loss(model, *copy_batch(batch_size, offset, vocab_size, context_length, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def copy_accuracy(
    model: CopyModel, offset: int, *, n_sequences: int = 500, seed: int = 1234
) -> float:
    """Fraction of positions (with a token `offset` back) where the model predicts that token."""
    vocab_size, context_length = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    g = torch.Generator().manual_seed(seed)
    idx, targets = copy_batch(n_sequences, offset, vocab_size, context_length, g)
    scored = targets != -100
    return (model(idx).argmax(-1)[scored] == targets[scored]).float().mean().item()


@torch.no_grad()
def attention_weights(att: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The causal softmax weights that `att` uses on x (batch, tokens, d_in): (batch, heads, tokens, tokens).

    Row i holds how much query position i attends to each key position (zero above the diagonal).
    """
    b, t, _ = x.shape
    q, k = (
        proj(x).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)
        for proj in (att.W_query, att.W_key)
    )
    scores = q @ k.transpose(-2, -1) / math.sqrt(att.head_dim)
    future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def copy_attention_pattern(
    model: CopyModel, *, n_sequences: int = 200, seed: int = 1234
) -> torch.Tensor:
    """Attention weights of `model` averaged over random sequences: (heads, tokens, tokens)."""
    g = torch.Generator().manual_seed(seed)
    vocab_size, context_length = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    idx = torch.randint(0, vocab_size, (n_sequences, context_length), generator=g)
    positions = torch.arange(context_length)
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(positions)
    return attention_weights(model.att, x).mean(0)
