"""The figures the notebooks draw; each returns its matplotlib Figure.

The slider figures call one pure function of lora_helpers.explore and only draw its result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib import ticker
from matplotlib.figure import Figure

from .explore import (
    SCALING_RULES,
    lora_parameter_counts,
    svd_relative_errors,
    update_size_after_training,
)


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
    """Relative error of the best rank-r approximation against r, one curve per named matrix."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, W in matrices.items():
        errors = svd_relative_errors(W).tolist()
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


def plot_update_size(
    rank: int, alpha: float, ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), steps: int = 10
) -> Figure:
    """Size of the update after the same `steps` Adam steps, against rank, one curve per scaling rule."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for rule in SCALING_RULES:
        sizes = [update_size_after_training(r, alpha, rule, steps=steps) for r in ranks]
        (line,) = ax.plot(ranks, sizes, "o-", markersize=3, label=f"scaling = {rule}")
        ax.plot(
            [rank],
            [update_size_after_training(rank, alpha, rule, steps=steps)],
            "o",
            markersize=8,
            color=line.get_color(),
        )
    ax.axvline(rank, color="grey", linestyle=":")
    ax.set(
        xlabel="rank r",
        ylabel=f"‖ΔW‖ after {steps} Adam steps",
        xscale="log",
        yscale="log",
        title=f"alpha = {alpha:g}: how far the same training moves the weights",
    )
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
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
