"""Two small tasks that train in seconds on a CPU.

- Notebook 02: a frozen linear layer whose target differs from it by a low-rank change.
- Notebook 03: a one-layer attention model pretrained to copy the token `offset` places
  back, then adapted (with LoRA on its attention) to copy from another offset.

Both run in float64 by default: at their size it costs little, and round-off (which
differs between CPUs, thread counts and torch versions) then stays far below the printed
digits. Runs follow lora_helpers.protocol: they train on training data, keep the parameters
of the step with the lowest validation loss (early stopping), and are reported on test data
that picked nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention, add_lora_to_attention
from .checks import positive_int
from .explore import lora_layer_arguments
from .lora import LinearWithLoRA, mark_only_lora_as_trainable
from .protocol import BestStep

#: The toy tasks' dtype: float64 keeps round-off far below the printed digits.
DTYPE = torch.float64
#: Generator seeds of the copy task's validation and test sequences (training batches use
#: the run's seed, a small number, so the three never share a stream).
VALIDATION_SEED = 4321
TEST_SEED = 1234
#: How many test sequences copy_loss and copy_accuracy (and so adapt_copy_model) score.
TEST_SEQUENCES = 500


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters; add LoRA layers or unfreeze some weights first."
        )
    return params


@dataclass
class TrainingRun:
    """What one training run saw.

    losses: training loss of each step (before that step's update).
    val_steps, val_losses: validation loss after that many steps (0: before training).
    best_step, val_loss: the step with the lowest validation loss, and that loss; the
    trained model holds the parameters of that step.
    """

    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_step: int = 0
    val_loss: float = math.inf

    @property
    def peak_ratio(self) -> float:
        """Highest training loss over the first one: above 1 means training overshot."""
        return max(self.losses) / self.losses[0]


def train_with_early_stopping(
    params: Sequence[nn.Parameter],
    training_loss: Callable[[], torch.Tensor],
    validation_loss: Callable[[], float],
    *,
    steps: int,
    lr: float,
    eval_every: int = 1,
) -> TrainingRun:
    """Adam on `params` for `steps` steps, then back to the parameters of the best validation step.

    training_loss() returns the (differentiable) loss of the next batch; validation_loss()
    a float, evaluated before training and every `eval_every` steps (and after the last).
    Raises ValueError for steps or eval_every below 1.
    """
    positive_int("steps", steps)
    positive_int("eval_every", eval_every)
    params = list(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    run = TrainingRun()
    best = BestStep(params)

    def validate(step: int) -> None:
        with torch.no_grad():
            loss = validation_loss()
        run.val_steps.append(step)
        run.val_losses.append(loss)
        if best.offer(step, loss):
            run.best_step, run.val_loss = step, loss

    validate(0)
    for step in range(1, steps + 1):
        loss = training_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            validate(step)
    if best.state is not None:  # None only if every validation loss was NaN
        best.restore()
    return run


# --- Notebook 02: a frozen layer learns a low-rank change -----------------------------------


class LowRankChangeTask(NamedTuple):
    base: nn.Linear  # the layer we start from (LinearWithLoRA freezes it)
    delta: torch.Tensor  # (out_dim, in_dim), the change of the target, rank `change_rank`
    x: torch.Tensor  # (n_samples, in_dim), training inputs
    y: torch.Tensor  # (n_samples, out_dim) = base(x) + x @ delta.T
    x_val: torch.Tensor  # validation: picks learning rates and the step to keep
    y_val: torch.Tensor
    x_test: torch.Tensor  # test: reported, used for nothing else
    y_test: torch.Tensor


def low_rank_change_task(
    in_dim: int = 64,
    out_dim: int = 64,
    change_rank: int = 2,
    *,
    n_samples: int = 512,
    seed: int = 0,
    dtype: torch.dtype = DTYPE,
) -> LowRankChangeTask:
    """A random nn.Linear(in_dim, out_dim) and targets from its weight plus a rank-`change_rank` change.

    Training, validation and test inputs are n_samples each, drawn independently.
    Leaves the global random state alone; raises ValueError for a change_rank outside
    1 .. min(in_dim, out_dim).
    """
    if not 1 <= change_rank <= min(in_dim, out_dim):
        raise ValueError(
            f"change_rank must be from 1 to min(in_dim, out_dim) = {min(in_dim, out_dim)}, "
            f"got {change_rank}."
        )
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = nn.Linear(in_dim, out_dim, dtype=dtype)  # drawn in dtype, not cast to it
    delta = torch.randn(out_dim, change_rank, generator=g, dtype=dtype) @ torch.randn(
        change_rank, in_dim, generator=g, dtype=dtype
    )
    delta /= math.sqrt(change_rank * in_dim)  # entries of x @ delta.T have variance ~1
    x, x_val, x_test = torch.randn(3, n_samples, in_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        y, y_val, y_test = (base(inputs) + inputs @ delta.T for inputs in (x, x_val, x_test))
    return LowRankChangeTask(base, delta, x, y, x_val, y_val, x_test, y_test)


def fit_regression(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor],
    steps: int = 300,
    lr: float = 1e-2,
) -> TrainingRun:
    """Full-batch Adam on the mean squared error of model(x) against y, early-stopped on val.

    x (n, in_dim), y (n, out_dim); val = (x_val, y_val) is scored after every step, and the
    model ends with the parameters of the step with the lowest validation loss.
    """
    x_val, y_val = val
    return train_with_early_stopping(
        _trainable(model),
        lambda: F.mse_loss(model(x), y),
        lambda: F.mse_loss(model(x_val), y_val).item(),
        steps=steps,
        lr=lr,
    )


@dataclass
class LoRAFit:
    """One LoRA layer fitted to a LowRankChangeTask, at its best validation step.

    test_loss: mean squared error on the test inputs; delta_error: ||ΔW - delta|| / ||delta||.
    """

    layer: LinearWithLoRA
    run: TrainingRun
    test_loss: float
    delta_error: float

    @property
    def val_loss(self) -> float:
        return self.run.val_loss

    @property
    def best_step(self) -> int:
        """The step kept (0: training never improved on the start; protocol.tune skips it)."""
        return self.run.best_step

    @property
    def peak_ratio(self) -> float:
        return self.run.peak_ratio


def fit_lora(
    task: LowRankChangeTask,
    rank: int,
    alpha: float,
    *,
    rule: str = "alpha/rank",
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
) -> LoRAFit:
    """Wrap a copy of task.base in LinearWithLoRA (A drawn from `seed`) and fit the change.

    rule: how the update is scaled, one of explore.SCALING_RULES ("alpha/rank",
    "alpha/sqrt(rank)", "alpha"). Leaves the global random state and task.base alone.
    """
    layer_alpha, rslora = lora_layer_arguments(rank, alpha, rule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = LinearWithLoRA(copy.deepcopy(task.base), rank, layer_alpha, rslora=rslora)
    run = fit_regression(layer, task.x, task.y, val=(task.x_val, task.y_val), steps=steps, lr=lr)
    with torch.no_grad():
        test_loss = F.mse_loss(layer(task.x_test), task.y_test).item()
        error = ((layer.lora.delta_weight() - task.delta).norm() / task.delta.norm()).item()
    return LoRAFit(layer, run, test_loss, error)


# --- Notebook 03: move where attention looks -------------------------------------------------


class CopyModel(nn.Module):
    """Token and position embeddings, one causal attention layer, a linear read-out.

    idx (batch, tokens) of ints < vocab_size -> logits (batch, tokens, vocab_size).
    """

    def __init__(
        self,
        vocab_size: int = 16,
        d_model: int = 32,
        context_length: int = 12,
        num_heads: int = 2,
        *,
        dtype: torch.dtype = DTYPE,
    ) -> None:
        super().__init__()
        # Every weight is drawn in `dtype` (float32 draws cast to float64 would differ in
        # their last bits between CPUs).
        self.tok_emb = nn.Embedding(vocab_size, d_model, dtype=dtype)
        self.pos_emb = nn.Embedding(context_length, d_model, dtype=dtype)
        self.att = MultiHeadAttention(d_model, d_model, context_length, 0.0, num_heads, dtype=dtype)
        self.head = nn.Linear(d_model, vocab_size, dtype=dtype)

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


def _copy_data(
    model: CopyModel, n_sequences: int, offset: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    vocab_size, context_length = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    g = torch.Generator().manual_seed(seed)
    return copy_batch(n_sequences, offset, vocab_size, context_length, g)


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
    eval_every: int = 10,
    val_sequences: int = 256,
) -> TrainingRun:
    """Adam on the trainable parameters to copy the token `offset` places back, early-stopped.

    Training batches are fresh random sequences from generator `seed`; the validation loss
    is measured every `eval_every` steps on `val_sequences` sequences from VALIDATION_SEED,
    and the model ends with the parameters of its best validation step. Raises ValueError
    for a batch_size or val_sequences below 1.
    """
    positive_int("batch_size", batch_size)
    positive_int("val_sequences", val_sequences)
    vocab_size, context_length = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    g = torch.Generator().manual_seed(seed)
    val_data = _copy_data(model, val_sequences, offset, VALIDATION_SEED)
    return train_with_early_stopping(
        _trainable(model),
        lambda: _copy_loss(model, *copy_batch(batch_size, offset, vocab_size, context_length, g)),
        lambda: _copy_loss(model, *val_data).item(),
        steps=steps,
        lr=lr,
        eval_every=eval_every,
    )


@torch.no_grad()
def copy_loss(
    model: CopyModel, offset: int, *, n_sequences: int = TEST_SEQUENCES, seed: int = TEST_SEED
) -> float:
    """Cross-entropy of predicting the token `offset` back, on n_sequences from generator `seed`."""
    return _copy_loss(model, *_copy_data(model, n_sequences, offset, seed)).item()


@torch.no_grad()
def copy_accuracy(
    model: CopyModel, offset: int, *, n_sequences: int = TEST_SEQUENCES, seed: int = TEST_SEED
) -> float:
    """Fraction of positions (with a token `offset` back) where the model predicts that token."""
    idx, targets = _copy_data(model, n_sequences, offset, seed)
    scored = targets != -100
    return (model(idx).argmax(-1)[scored] == targets[scored]).double().mean().item()


@dataclass
class CopyAdaptation:
    """A pretrained CopyModel adapted with LoRA on attention, at its best validation step."""

    model: CopyModel
    run: TrainingRun
    test_loss: float
    test_accuracy: float

    @property
    def val_loss(self) -> float:
        return self.run.val_loss

    @property
    def best_step(self) -> int:
        """The step kept (0: training never improved on the start; protocol.tune skips it)."""
        return self.run.best_step


def adapt_copy_model(
    pretrained: CopyModel,
    which: str,
    rank: int,
    *,
    offset: int = 2,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
) -> CopyAdaptation:
    """Adapt a frozen copy of `pretrained` to copy from `offset` back, with LoRA on attention.

    which: the projections to adapt ("qv", "qkvo", ...; see attention.add_lora_to_attention),
    each at `rank` with alpha = 2 * rank. `seed` draws the LoRA A matrices and the training
    batches; the run is early-stopped on validation data and scored on the test set
    (copy_loss, copy_accuracy). `pretrained` is left alone. Raises ValueError for a
    batch_size below 1.
    """
    positive_int("batch_size", batch_size)
    model = copy.deepcopy(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mark_only_lora_as_trainable(add_lora_to_attention(model, which, rank=rank, alpha=2 * rank))
    run = train_copy_task(model, offset, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    return CopyAdaptation(model, run, copy_loss(model, offset), copy_accuracy(model, offset))


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
    model: CopyModel, *, n_sequences: int = 200, seed: int = TEST_SEED
) -> torch.Tensor:
    """Attention weights of `model` averaged over random sequences: (heads, tokens, tokens)."""
    g = torch.Generator().manual_seed(seed)
    vocab_size, context_length = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    idx = torch.randint(0, vocab_size, (n_sequences, context_length), generator=g)
    positions = torch.arange(context_length)
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(positions)
    return attention_weights(model.att, x).mean(0)
