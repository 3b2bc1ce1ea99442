"""Small, fast experiments behind notebooks 06 and 07: a tiny transformer, a task family, LoRA runs.

The tasks: a sequence of CONTEXT random tokens from a VOCAB-token alphabet; at each position t
the model predicts the token `shift` places back, with some pairs of tokens renamed (swapped).
A model "pretrained" on copy-the-previous-token (shift 1, nothing renamed) is then adapted to a
variant: renaming k pairs changes the token-to-output map by a matrix of rank k, and a larger
shift changes where attention looks. Every linear layer of the model is 32 x 32, so LoRA of
rank r costs 64 r parameters on any of them. One training run takes about a second on a CPU.
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
    LinearWithLoRA,
    count_parameters,
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
    """One fine-tuning run: its model, curves and final numbers."""

    label: str
    model: nn.Module = field(repr=False)
    trainable: int
    train_curve: list[float] = field(repr=False)
    heldout_curve: list[tuple[int, float]] = field(repr=False)
    train_loss: float
    heldout_loss: float
    heldout_accuracy: float


def train_run(
    model: nn.Module,
    train_data: Data,
    heldout: Data,
    *,
    label: str,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    eval_every: int = 10,
) -> Run:
    """Train the trainable parameters of `model` in place (see train) and collect a Run."""
    model.train()
    train_curve, heldout_curve = train(
        model, train_data, steps=steps, lr=lr, seed=seed, heldout=heldout, eval_every=eval_every
    )
    model.eval()
    loss, accuracy = loss_and_accuracy(model, heldout)
    return Run(
        label=label,
        model=model,
        trainable=count_parameters(model).trainable,
        train_curve=train_curve,
        heldout_curve=heldout_curve,
        train_loss=loss_and_accuracy(model, train_data)[0],
        heldout_loss=loss,
        heldout_accuracy=accuracy,
    )


def lora_run(
    base: nn.Module,
    train_data: Data,
    heldout: Data,
    rank: int,
    alpha: float,
    *,
    rule: str = "alpha/r",
    targets: Sequence[str] = ("Q", "K", "V", "O"),
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    eval_every: int = 10,
) -> Run:
    """Fine-tune a copy of `base` with LoRA on `targets` (short names); `base` is not touched."""
    scaling_of(rank, alpha, rule)  # checks the rule
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    replace_linear_with_lora(
        model, rank, alpha, module_names(targets), rslora=rule == "alpha/sqrt(r)"
    )
    mark_only_lora_as_trainable(model)
    label = f"LoRA, rank {rank}, alpha {alpha:g}, {rule}"
    return train_run(
        model,
        train_data,
        heldout,
        label=label,
        steps=steps,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
    )


def full_finetune_run(
    base: nn.Module,
    train_data: Data,
    heldout: Data,
    *,
    targets: Sequence[str] = tuple(LINEAR_NAMES),
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
) -> Run:
    """Train every entry of the weight matrices `targets` of a copy of `base` (biases stay frozen)."""
    model = copy.deepcopy(base).requires_grad_(False)
    for name in module_names(targets):
        model.get_submodule(name).weight.requires_grad_(True)
    return train_run(
        model, train_data, heldout, label="full fine-tuning", steps=steps, lr=lr, seed=seed
    )


def plot_runs(runs: Sequence[Run], title: str = "") -> plt.Figure:
    """Training loss (thin) and held-out loss (thick) against step, one colour per run."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.plot(run.train_curve, color=color, alpha=0.35, lw=1)
        steps, losses = zip(*run.heldout_curve, strict=True)
        ax.plot(
            steps, losses, color=color, lw=2, label=f"{run.label}: held-out {run.heldout_loss:.3f}"
        )
    ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title=title)
    ax.legend(fontsize=8, title="thin: training loss, thick: held-out", title_fontsize=8)
    fig.tight_layout()
    return fig


def rank_alpha_figure(
    base: nn.Module, train_data: Data, heldout: Data, rank: int, alpha: float, rule: str
) -> plt.Figure:
    """The slider's function: one LoRA run (Q, K, V, O) with these settings, plotted."""
    run = lora_run(base, train_data, heldout, rank, alpha, rule=rule)
    return plot_runs([run], title=f"scaling = {rule} = {scaling_of(rank, alpha, rule):.3g}")


@dataclass
class Sweep:
    """Final losses of a grid of runs: rows are ranks, columns alphas."""

    ranks: list[int]
    alphas: list[float]
    rule: str
    train_loss: torch.Tensor  # (len(ranks), len(alphas))
    heldout_loss: torch.Tensor  # (len(ranks), len(alphas))


def scaling_of(rank: int, alpha: float, rule: str) -> float:
    """The factor LoRA multiplies its update by: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    return alpha / (rank if rule == "alpha/r" else math.sqrt(rank))


def sweep_rank_alpha(
    base: nn.Module,
    train_data: Data,
    heldout: Data,
    ranks: Sequence[int],
    alphas: Sequence[float],
    *,
    rules: Sequence[str] = RULES,
    steps: int = 150,
    seed: int = 0,
) -> list[Sweep]:
    """One LoRA run (Q, K, V, O) per (rank, alpha) and rule; runs with equal scaling are shared."""
    done: dict[tuple[int, float], Run] = {}  # at rank 1 both rules give the same run
    sweeps = []
    for rule in rules:
        train_loss = torch.empty(len(ranks), len(alphas))
        heldout_loss = torch.empty(len(ranks), len(alphas))
        for i, rank in enumerate(ranks):
            for j, alpha in enumerate(alphas):
                key = (rank, scaling_of(rank, alpha, rule))
                if key not in done:
                    done[key] = lora_run(
                        base,
                        train_data,
                        heldout,
                        rank,
                        alpha,
                        rule=rule,
                        steps=steps,
                        seed=seed,
                        eval_every=steps,
                    )
                train_loss[i, j] = done[key].train_loss
                heldout_loss[i, j] = done[key].heldout_loss
        sweeps.append(
            Sweep(list(ranks), [float(a) for a in alphas], rule, train_loss, heldout_loss)
        )
    return sweeps


def plot_sweeps(sweeps: Sequence[Sweep]) -> plt.Figure:
    """Heat maps of final training loss (top row) and held-out loss (bottom row), one column per sweep."""
    fig, axes = plt.subplots(
        2, len(sweeps), figsize=(4.2 * len(sweeps), 6.4), squeeze=False, layout="constrained"
    )
    for row, which in enumerate(("train_loss", "heldout_loss")):
        grids = [getattr(s, which) for s in sweeps]
        vmin, vmax = min(g.min().item() for g in grids), max(g.max().item() for g in grids)
        for ax, sweep, grid in zip(axes[row], sweeps, grids, strict=True):
            image = ax.imshow(grid.numpy(), cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    dark = grid[i, j] > (vmin + vmax) / 2
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
            ax.set_xticks(range(len(sweep.alphas)), [f"{a:g}" for a in sweep.alphas])
            ax.set_yticks(range(len(sweep.ranks)), sweep.ranks)
            name = "training loss" if which == "train_loss" else "held-out loss"
            ax.set(xlabel="alpha", ylabel="rank", title=f"{name}, scaling {sweep.rule}")
        fig.colorbar(image, ax=axes[row].tolist(), shrink=0.9)
    return fig


@dataclass
class RankFit:
    """Final losses against rank, one row per seed: (len(seeds), len(ranks)) each."""

    ranks: list[int]
    train_loss: torch.Tensor
    heldout_loss: torch.Tensor


def fit_by_rank(
    base: nn.Module,
    train_data: Data,
    heldout: Data,
    ranks: Sequence[int],
    *,
    scaling: float = 2.0,
    seeds: Sequence[int] = (0, 1),
    steps: int = 300,
) -> RankFit:
    """LoRA (Q, K, V, O) at each rank with alpha = scaling * rank (so alpha/r is fixed), per seed."""
    train_loss = torch.empty(len(seeds), len(ranks))
    heldout_loss = torch.empty(len(seeds), len(ranks))
    for s, seed in enumerate(seeds):
        for i, rank in enumerate(ranks):
            run = lora_run(
                base,
                train_data,
                heldout,
                rank,
                scaling * rank,
                steps=steps,
                seed=seed,
                eval_every=steps,
            )
            train_loss[s, i], heldout_loss[s, i] = run.train_loss, run.heldout_loss
    return RankFit(list(ranks), train_loss, heldout_loss)


def plot_fit_by_rank(fit: RankFit) -> plt.Figure:
    """Training and held-out loss against rank: mean over seeds, with each seed as a dot."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, grid, color in (
        ("training loss", fit.train_loss, "C0"),
        ("held-out loss", fit.heldout_loss, "C3"),
    ):
        ax.plot(fit.ranks, grid.mean(0), "o-", color=color, label=name)
        for row in grid:
            ax.plot(fit.ranks, row, ".", color=color, alpha=0.4)
    ax.set(xscale="log", xlabel="rank r", ylabel="final cross-entropy")
    ax.set_xticks(fit.ranks, [str(r) for r in fit.ranks])
    ax.legend()
    fig.tight_layout()
    return fig


def budget_ranks(budget: int, target_sets: dict[str, list[str]] = TARGET_SETS) -> dict[str, int]:
    """The LoRA rank that spends exactly `budget` parameters on each target set.

    Every linear layer is D_MODEL x D_MODEL, so rank r on k of them costs r * k * 2 * D_MODEL.
    """
    ranks = {}
    for name, keys in target_sets.items():
        per_rank = len(module_names(keys)) * 2 * D_MODEL
        if budget % per_rank or not 1 <= budget // per_rank <= D_MODEL:
            raise ValueError(
                f"A budget of {budget} parameters does not give {name!r} a whole rank between 1 "
                f"and {D_MODEL} (one rank costs {per_rank}); use a multiple of "
                f"{math.lcm(*(len(k) * 2 * D_MODEL for k in target_sets.values()))}."
            )
        ranks[name] = budget // per_rank
    return ranks


@dataclass
class TargetResult:
    """Held-out loss and accuracy of one target set, one entry per seed."""

    name: str
    rank: int
    trainable: int
    heldout_loss: list[float]
    heldout_accuracy: list[float]


def compare_targets(
    base: nn.Module,
    train_data: Data,
    heldout: Data,
    budget: int,
    *,
    target_sets: dict[str, list[str]] = TARGET_SETS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
) -> list[TargetResult]:
    """LoRA on each target set at the rank budget_ranks gives it (alpha = 2 * rank), per seed."""
    results = []
    for name, rank in budget_ranks(budget, target_sets).items():
        runs = [
            lora_run(
                base,
                train_data,
                heldout,
                rank,
                2 * rank,
                targets=target_sets[name],
                steps=steps,
                seed=seed,
                eval_every=steps,
            )
            for seed in seeds
        ]
        results.append(
            TargetResult(
                name,
                rank,
                runs[0].trainable,
                [r.heldout_loss for r in runs],
                [r.heldout_accuracy for r in runs],
            )
        )
    return results


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets_table(results: Sequence[TargetResult]) -> str:
    """compare_targets' results as a table: mean and spread (min-max) over seeds."""
    rows = []
    for r in results:
        loss = torch.tensor(r.heldout_loss)
        acc = 100 * torch.tensor(r.heldout_accuracy)
        rows.append(
            [
                r.name,
                r.rank,
                r.trainable,
                f"{loss.mean():.3f} ({loss.min():.3f}-{loss.max():.3f})",
                f"{acc.mean():.1f} ({acc.min():.1f}-{acc.max():.1f})",
            ]
        )
    headers = ["adapted", "rank", "parameters", "held-out loss (min-max)", "accuracy % (min-max)"]
    return format_table(headers, rows)


# --- Notebook 07: the rank of a full fine-tuning's update ---------------------------------


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer applies, (out, in): W of an nn.Linear, W + dW of an unmerged LinearWithLoRA."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if isinstance(layer, LinearWithLoRA) and not layer.merged:
        return (layer.linear.weight + layer.lora.delta_weight()).detach()
    raise TypeError(
        f"Expected an nn.Linear or an unmerged LinearWithLoRA, got {type(layer).__name__}."
    )


def weight_deltas(
    base: nn.Module, tuned: nn.Module, keys: Sequence[str] = tuple(LINEAR_NAMES)
) -> dict[str, torch.Tensor]:
    """dW = W_tuned - W_base for each layer key ("Q", ...), each (out, in)."""
    return {
        key: effective_weight(tuned.get_submodule(name))
        - effective_weight(base.get_submodule(name))
        for key, name in zip(keys, module_names(keys), strict=True)
    }


def energy_in_top(singular_values: torch.Tensor, r: int) -> float:
    """Fraction of ||dW||_F^2 in the top r singular values: sum(s[:r]^2) / sum(s^2)."""
    energy = singular_values.double() ** 2
    return (energy[:r].sum() / energy.sum()).item()


def best_rank_approx(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The closest rank-r matrix to `delta` (out, in) in Frobenius norm: its truncated SVD."""
    if not 1 <= r <= min(delta.shape):
        raise ValueError(f"r must be in 1..{min(delta.shape)} for a {tuple(delta.shape)} matrix.")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def with_deltas(base: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `base` with W += dW on each layer key of `deltas`."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for key, delta in deltas.items():
            model.get_submodule(module_names([key])[0]).weight += delta
    return model


def evaluate_truncated(
    base: nn.Module, deltas: dict[str, torch.Tensor], heldout: Data, ranks: Sequence[int]
) -> list[tuple[float, float]]:
    """(held-out loss, accuracy) of base + every dW cut to its best rank-r approximation, per r."""
    return [
        loss_and_accuracy(
            with_deltas(base, {k: best_rank_approx(d, r) for k, d in deltas.items()}), heldout
        )
        for r in ranks
    ]


def plot_spectra(deltas: dict[str, torch.Tensor], mark: int | None = None) -> plt.Figure:
    """Singular values of each dW (left) and the cumulative share of ||dW||^2 (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (key, delta) in enumerate(deltas.items()):
        s = torch.linalg.svdvals(delta)
        index = torch.arange(1, len(s) + 1)
        left.plot(index, s, ".-", color=f"C{i}", label=key)
        right.plot(index, (s**2).cumsum(0) / (s**2).sum(), ".-", color=f"C{i}", label=key)
    left.set(xlabel="index i", ylabel="singular value σ_i of ΔW", yscale="log")
    right.set(xlabel="r", ylabel="share of ||ΔW||² in the top r", ylim=(0, 1.02))
    if mark is not None:
        for ax in (left, right):
            ax.axvline(mark, color="grey", ls=":", lw=1)
    left.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_vs_rank(
    ranks: Sequence[int], curves: dict[str, Sequence[float]], reference: dict[str, float]
) -> plt.Figure:
    """Held-out loss against rank, one line per curve, dashed lines for reference losses."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, losses) in enumerate(curves.items()):
        ax.plot(ranks, losses, "o-", color=f"C{i}", label=name)
    for i, (name, loss) in enumerate(reference.items()):
        ax.axhline(loss, color=f"C{i + len(curves)}", ls="--", lw=1, label=name)
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="held-out cross-entropy")
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
