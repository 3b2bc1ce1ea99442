"""Small, fast experiments behind notebooks 06 and 07: a tiny transformer, a task family, LoRA runs.

The tasks: a sequence of CONTEXT random tokens from a VOCAB-token alphabet; at each position t
the model predicts the token `shift` places back, with some pairs of tokens renamed (swapped).
A model "pretrained" on copy-the-previous-token (shift 1, nothing renamed) is then adapted to a
variant: renaming k pairs changes the token-to-output map by a matrix of rank k, and a larger
shift changes where attention looks. Every linear layer of the model is 32 x 32, so LoRA of
rank r costs 64 r parameters on any of them. One training run takes well under a second on a CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .lora import (
    count_parameters,
    lora_layers,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
)

VOCAB = 16  # tokens 0..15
CONTEXT = 8  # tokens per sequence
D_MODEL = 32  # width of every layer: all six linear layers are 32 x 32
IGNORE = -100  # target at positions with nothing `shift` places back

#: The six linear layers of the block, by the names the LoRA paper uses.
LINEAR_NAMES = {
    "Q": "att.W_query",
    "K": "att.W_key",
    "V": "att.W_value",
    "O": "att.out_proj",
    "MLP1": "mlp.fc1",
    "MLP2": "mlp.fc2",
}
#: Choices of matrices to adapt, compared at a fixed parameter budget (LoRA paper, section 7.1).
TARGET_SETS = {
    "Q": ["Q"],
    "K": ["K"],
    "V": ["V"],
    "O": ["O"],
    "Q+V": ["Q", "V"],
    "Q+K+V+O": ["Q", "K", "V", "O"],
    "attention+MLP": ["Q", "K", "V", "O", "MLP1", "MLP2"],
}
RULES = ("alpha/r", "alpha/sqrt(r)")


@dataclass(frozen=True)
class Task:
    """Predict the token `shift` places back, with token pairs (2i, 2i+1) for i in `pairs` swapped.

    noise: fraction of training targets replaced by a random token (held-out sets are clean).
    """

    shift: int = 1
    pairs: tuple[int, ...] = ()
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.shift < CONTEXT:
            raise ValueError(f"shift must be in 1..{CONTEXT - 1}, got {self.shift!r}.")
        bad = [p for p in self.pairs if not 0 <= p < VOCAB // 2]
        if bad or len(set(self.pairs)) != len(self.pairs):
            raise ValueError(
                f"pairs must be distinct integers in 0..{VOCAB // 2 - 1} (pair i swaps tokens "
                f"2i and 2i+1), got {self.pairs!r}."
            )
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {self.noise!r}.")

    def relabel(self) -> torch.Tensor:
        """The renaming as a lookup table, shape (VOCAB,): token -> target token."""
        table = torch.arange(VOCAB)
        for p in self.pairs:
            table[2 * p], table[2 * p + 1] = 2 * p + 1, 2 * p
        return table


#: Pretraining: copy the previous token.
PRETRAIN_TASK = Task()
#: Fine-tuning, part 1: copy the previous token with 4 pairs renamed (a rank-4 change of the map).
RENAME_TASK = Task(pairs=(0, 1, 2, 3))
#: Fine-tuning, part 2: also look one token further back (a change of where attention looks).
SHIFT_RENAME_TASK = Task(shift=2, pairs=(0, 1, 2, 3))


@dataclass(frozen=True)
class Data:
    """Token sequences x and targets y, both (n, CONTEXT); y is IGNORE where undefined."""

    x: torch.Tensor
    y: torch.Tensor


def make_data(task: Task, n: int, seed: int, *, clean: bool = False) -> Data:
    """n random sequences and their targets under `task`; clean=True skips the label noise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer number of sequences, got {n!r}.")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    y = task.relabel()[torch.roll(x, task.shift, dims=1)]
    noisy = torch.rand(y.shape, generator=g) < (0.0 if clean else task.noise)
    y = torch.where(noisy, torch.randint(0, VOCAB, y.shape, generator=g), y)
    y[:, : task.shift] = IGNORE
    return Data(x, y)


class MLP(nn.Module):
    """x (..., D_MODEL) -> fc2(gelu(fc1(x))), same shape."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyTransformer(nn.Module):
    """One pre-norm transformer block: tokens (batch, CONTEXT) -> logits (batch, CONTEXT, VOCAB)."""

    def __init__(self, d: int = D_MODEL, heads: int = 2) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(VOCAB, d), nn.Embedding(CONTEXT, d)
        self.norm1, self.norm2, self.norm_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = MultiHeadAttention(d, d, CONTEXT, dropout=0.0, num_heads=heads)
        self.mlp = MLP(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        h = h + self.att(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm_f(h))


def loss_and_accuracy(model: nn.Module, data: Data) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the positions that have a target."""
    with torch.no_grad():
        logits = model(data.x)
    mask = data.y != IGNORE
    loss = F.cross_entropy(logits[mask], data.y[mask]).item()
    accuracy = (logits.argmax(-1)[mask] == data.y[mask]).float().mean().item()
    return loss, accuracy


def train(
    model: nn.Module,
    data: Data,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    heldout: Data | None = None,
    eval_every: int = 10,
) -> tuple[list[float], list[tuple[int, float]]]:
    """Adam on the trainable parameters; returns (train loss per step, [(step, held-out loss)])."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; add LoRA or unfreeze some first.")
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    mask = data.y != IGNORE
    train_curve, heldout_curve = [], []
    for step in range(steps):
        if heldout is not None and step % eval_every == 0:
            heldout_curve.append((step, loss_and_accuracy(model, heldout)[0]))
        idx = (
            torch.randperm(len(data.x), generator=g)[:batch_size]
            if len(data.x) > batch_size
            else slice(None)
        )
        logits, y, m = model(data.x[idx]), data.y[idx], mask[idx]
        loss = F.cross_entropy(logits[m], y[m])
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_curve.append(loss.item())
    if heldout is not None:
        heldout_curve.append((steps, loss_and_accuracy(model, heldout)[0]))
    return train_curve, heldout_curve


def pretrained_model(seed: int = 0, steps: int = 300) -> TinyTransformer:
    """A TinyTransformer trained on PRETRAIN_TASK (copy the previous token), frozen, in eval mode."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    train(model, make_data(PRETRAIN_TASK, 4096, seed), steps=steps, lr=3e-3, seed=seed)
    return model.requires_grad_(False).eval()


def module_names(keys: Sequence[str]) -> list[str]:
    """Short names ("Q", "MLP1", ...) -> the model's module names ("att.W_query", ...)."""
    unknown = [k for k in keys if k not in LINEAR_NAMES]
    if unknown or not keys:
        raise ValueError(
            f"Unknown layer name(s) {unknown or list(keys)!r}; use some of {list(LINEAR_NAMES)}."
        )
    return [LINEAR_NAMES[k] for k in keys]


@dataclass
class Run:
    """One fine-tuning run: settings, curves and final numbers."""

    rank: int
    alpha: float
    rule: str
    targets: list[str]
    trainable: int
    train_curve: list[float] = field(repr=False)
    heldout_curve: list[tuple[int, float]] = field(repr=False)
    train_loss: float
    heldout_loss: float
    heldout_accuracy: float


def lora_run(
    base: nn.Module,
    train_data: Data,
    heldout: Data,
    rank: int,
    alpha: float,
    *,
    rule: str = "alpha/r",
    targets: Sequence[str] = ("Q", "K", "V", "O", "MLP1", "MLP2"),
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
) -> Run:
    """Fine-tune a copy of `base` with LoRA on `targets` (short names); `base` is not touched."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    replace_linear_with_lora(
        model, rank, alpha, module_names(targets), rslora=rule == "alpha/sqrt(r)"
    )
    mark_only_lora_as_trainable(model)
    model.train()
    train_curve, heldout_curve = train(
        model, train_data, steps=steps, lr=lr, seed=seed, heldout=heldout
    )
    model.eval()
    loss, accuracy = loss_and_accuracy(model, heldout)
    return Run(
        rank=rank,
        alpha=float(alpha),
        rule=rule,
        targets=list(targets),
        trainable=count_parameters(model).trainable,
        train_curve=train_curve,
        heldout_curve=heldout_curve,
        train_loss=loss_and_accuracy(model, train_data)[0],
        heldout_loss=loss,
        heldout_accuracy=accuracy,
    )
