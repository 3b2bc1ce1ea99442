"""The figures the notebooks draw; each returns its matplotlib Figure.

The slider figures call one pure function of lora_helpers.explore and only draw its result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib import ticker
from matplotlib.figure import Figure

from .explore import SCALING_RULES, brief_training, lora_parameter_counts, svd_relative_errors


def plot_parameter_counts(d: int, k: int, rank: int) -> Figure:
    """Weights of a full d x k update against rank-r LoRA, r = 1 .. min(d, k), chosen rank marked."""
    chosen = lora_parameter_counts(d, k, rank)
    ranks = range(1, min(d, k) + 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(ranks, [lora_parameter_counts(d, k, r).lora for r in ranks], label="LoRA: r·(d+k)")
    ax.axhline(chosen.full, color="black", linestyle="--", label="full update: d·k")
    ax.axvline(chosen.break_even_rank, color="grey", linestyle=":", label="break-even rank")
    ax.plot([rank], [chosen.lora], "o", color="tab:red", label=f"r = {rank}")
    ax.set(xlabel="rank r", ylabel="trainable weights", xscale="log", yscale="log")
    ax.set_title(
        f"{d}×{k}: full {chosen.full:,} weights, LoRA (r={rank}) {chosen.lora:,} "
        f"({100 * chosen.ratio:.3g} %)",
        fontsize=10,
    )
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_svd_errors(matrices: Mapping[str, torch.Tensor], rank: int) -> Figure:
    """Relative error of the best rank-r approximation against r, one curve per named matrix.

    Raises ValueError unless rank is an int from 0 to the largest min(d, k) of the matrices.
    """
    curves = {name: svd_relative_errors(W).tolist() for name, W in matrices.items()}
    top = max((len(errors) - 1 for errors in curves.values()), default=0)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= top:
        raise ValueError(
            f"rank must be an integer from 0 to {top} (the largest min(d, k) of the matrices), "
            f"got {rank!r}."
        )
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, errors in curves.items():
        (line,) = ax.plot(range(len(errors)), errors, label=name)
        if rank < len(errors):
            ax.plot([rank], [errors[rank]], "o", color=line.get_color())
            ax.annotate(
                f"{errors[rank]:.3g}",
                (rank, errors[rank]),
                textcoords="offset points",
                xytext=(6, 4),
            )
    ax.axvline(rank, color="grey", linestyle=":")
    ax.set(
        xlabel="rank r of the approximation",
        ylabel="‖W − W_r‖ / ‖W‖",
        ylim=(0, 1.05),
        title=f"best rank-{rank} approximation (truncated SVD)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _band(ax, x: Sequence[float], runs: Sequence[Sequence[float]], label: str, **style) -> str:
    """The mean over runs as a line, smallest to largest as a shaded band; returns its colour."""
    values = torch.tensor([list(map(float, run)) for run in runs], dtype=torch.float64)
    (line,) = ax.plot(x, values.mean(0).tolist(), label=label, **style)
    low, high = values.min(0).values.tolist(), values.max(0).values.tolist()
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
    return line.get_color()


def plot_update_size(
    rank: int,
    alpha: float,
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    steps: int = 10,
    seeds: Sequence[int] = (0, 1, 2),
) -> Figure:
    """What the same `steps` Adam steps do at each rank, one curve per scaling rule.

    Left: the size of the update ||ΔW||; right: the fraction of the loss removed. Lines are
    the mean over `seeds` (explore.brief_training), bands the smallest to largest; the
    chosen `rank` is marked.
    """
    fig, (size_ax, drop_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for rule in SCALING_RULES:
        runs = {
            r: [brief_training(r, alpha, rule, steps=steps, seed=s) for s in seeds]
            for r in {*ranks, rank}
        }
        for ax, value, scale in ((size_ax, "update_size", 1), (drop_ax, "loss_drop", 100)):
            per_seed = [
                [scale * getattr(runs[r][i], value) for r in ranks] for i in range(len(seeds))
            ]
            color = _band(ax, ranks, per_seed, f"scaling = {rule}", marker="o", markersize=3)
            at_rank = [scale * getattr(b, value) for b in runs[rank]]
            ax.plot([rank], [sum(at_rank) / len(at_rank)], "o", markersize=8, color=color)
    size_ax.set(ylabel=f"‖ΔW‖ after {steps} Adam steps", title="size of the update")
    drop_ax.set(ylabel=f"% of the loss removed in {steps} steps", title="progress on the loss")
    for ax in (size_ax, drop_ax):
        ax.axvline(rank, color="grey", linestyle=":")
        ax.set(xlabel="rank r", xscale="log", yscale="log")
        ax.set_xticks(list(ranks), [str(r) for r in ranks])
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    size_ax.legend(fontsize=8)
    fig.suptitle(
        f"alpha = {alpha:g}, the same learning rate at every rank ({len(seeds)} seeds)", fontsize=10
    )
    fig.tight_layout()
    return fig


def plot_loss_spread(
    curves: Mapping[str, Sequence[Sequence[float]]],
    title: str,
    *,
    log: bool = True,
    ylabel: str = "training loss",
) -> Figure:
    """Loss against step, one band per name: the mean over its runs (seeds), and their range.

    curves: name -> one loss curve per run, all of the same length.
    """
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, runs in curves.items():
        if not runs or len({len(run) for run in runs}) != 1:
            raise ValueError(f"{name!r}: give one or more loss curves of the same length.")
        _band(ax, range(1, len(runs[0]) + 1), runs, f"{name} ({len(runs)} runs)")
    ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log" if log else "linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(curves: Mapping[str, Sequence[float]], title: str, log: bool = True) -> Figure:
    """Training loss against step, one curve per name."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log" if log else "linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_attention_patterns(patterns: Mapping[str, torch.Tensor]) -> Figure:
    """One heatmap per name of attention weights (tokens, tokens): row = query, column = key."""
    n = len(patterns)
    fig, axes = plt.subplots(
        1, n, figsize=(2.8 * n + 1, 3.2), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, (name, weights) in zip(axes[0], patterns.items(), strict=True):
        if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
            raise ValueError(
                f"{name!r}: expected square attention weights (tokens, tokens), got "
                f"{tuple(weights.shape)}; average over batch and heads first."
            )
        image = ax.imshow(weights.detach().cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set(title=name, xlabel="key position")
    axes[0][0].set_ylabel("query position")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
    return fig


def plot_lora_module(d: int = 768, k: int = 768, rank: int = 8) -> Figure:
    """The LoRA module as in the LoRA paper's Figure 1: h = W x + (alpha/r) B A x.

    The input x (k numbers) goes up two paths: through the frozen d x k weight W, and through
    A (r x k, random) down to r numbers and B (d x r, zero at the start) back up to d; the
    outputs are added. Widths are drawn to scale up to the smallest shown.
    """
    lora_parameter_counts(d, k, rank)  # checks d, k and rank
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.set(xlim=(0, 10), ylim=(0.4, 10.2), aspect="equal")
    ax.axis("off")

    def width(n: int) -> float:
        """Drawn width of n numbers: to scale, but never thinner than a line."""
        return 3.2 * max(n / max(d, k), 0.08)

    frozen, lora_color = "#8fb3d9", "#f3b37a"
    # the frozen path: one box
    ax.add_patch(plt.Rectangle((0.6, 3.0), 3.6, 3.6, color=frozen))
    ax.text(2.4, 5.2, f"W\n{d} × {k}", ha="center", va="center", fontsize=12)
    ax.text(2.4, 3.6, "pretrained, frozen", ha="center", va="center", fontsize=9, style="italic")
    # the LoRA path: A narrows k to r, B widens r to d (trapezoids, as in the paper)
    cx, mid = 7.3, 4.8
    wk, wr, wd = width(k), width(rank), width(d)
    a = [(cx - wk / 2, 3.0), (cx + wk / 2, 3.0), (cx + wr / 2, mid), (cx - wr / 2, mid)]
    b = [(cx - wr / 2, mid), (cx + wr / 2, mid), (cx + wd / 2, 6.6), (cx - wd / 2, 6.6)]
    ax.add_patch(plt.Polygon(a, color=lora_color))
    ax.add_patch(plt.Polygon(b, color=lora_color, alpha=0.75))
    ax.text(cx + wk / 2 + 0.2, 3.9, f"A: {rank} × {k}\nrandom", va="center", fontsize=10)
    ax.text(cx + wd / 2 + 0.2, 5.7, f"B: {d} × {rank}\nzero at the start", va="center", fontsize=10)
    ax.text(cx - wr / 2 - 0.2, mid, f"r = {rank}", ha="right", va="center", fontsize=10)
    # input below, sum and output above
    arrow = {"arrowstyle": "->", "color": "black", "lw": 1.2}
    ax.text(5.0, 0.9, f"x  ({k} numbers)", ha="center", va="center", fontsize=11)
    for x_end in (2.4, cx):
        ax.annotate("", xy=(x_end, 3.0), xytext=(5.0, 1.3), arrowprops=arrow)
    ax.add_patch(plt.Circle((5.0, 8.0), 0.35, fill=False, lw=1.2))
    ax.text(5.0, 8.0, "+", ha="center", va="center", fontsize=14)
    ax.annotate("", xy=(4.7, 7.8), xytext=(2.4, 6.6), arrowprops=arrow)
    ax.annotate("", xy=(5.3, 7.8), xytext=(cx, 6.6), arrowprops=arrow)
    ax.text(6.4, 7.5, "× α/r", fontsize=10)
    ax.annotate("", xy=(5.0, 9.2), xytext=(5.0, 8.35), arrowprops=arrow)
    ax.text(
        5.0, 9.6, f"h = W x + (α/r) B A x   ({d} numbers)", ha="center", va="center", fontsize=11
    )
    fig.suptitle("A LoRA-adapted layer (after the LoRA paper's Figure 1)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_parameter_shares(breakdowns: Mapping[str, Mapping[str, int]]) -> Figure:
    """One horizontal bar per model: the share of its parameters in each large component.

    breakdowns: model name -> lora_helpers.gpt2.parameter_breakdown(model).
    """
    parts = ("token embedding", "position embedding", "attention (Q, K, V, out)", "feed-forward")
    fig, ax = plt.subplots(figsize=(8, 3))
    left = [0.0] * len(breakdowns)
    for part in parts:
        share = [100 * counts[part] / sum(counts.values()) for counts in breakdowns.values()]
        ax.barh(list(breakdowns), share, left=left, label=part)
        left = [a + b for a, b in zip(left, share, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("share of all parameters (%)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, frameon=False)
    ax.set_title("Where GPT-2's parameters live")
    fig.tight_layout()
    return fig
