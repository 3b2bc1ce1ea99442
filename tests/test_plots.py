"""lora_helpers.plots: each figure draws what its pure function computes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from lora_helpers.explore import brief_training, lora_parameter_counts, svd_relative_errors
from lora_helpers.plots import (
    plot_attention_patterns,
    plot_loss_spread,
    plot_losses,
    plot_parameter_counts,
    plot_svd_errors,
    plot_update_size,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_plot_parameter_counts():
    fig = plot_parameter_counts(100, 500, 5)
    (ax,) = fig.axes
    assert "full 50,000 weights, LoRA (r=5) 3,000 (6 %)" in ax.get_title()
    curve = ax.get_lines()[0]
    assert list(curve.get_xdata()) == list(range(1, 101))
    assert curve.get_ydata()[4] == lora_parameter_counts(100, 500, 5).lora


def test_plot_parameter_counts_rejects_a_rank_above_min_d_k():
    with pytest.raises(ValueError, match="rank 101 is larger than min"):
        plot_parameter_counts(100, 500, 101)


def test_plot_svd_errors_draws_one_curve_per_matrix():
    torch.manual_seed(0)
    matrices = {"a": torch.randn(5, 8), "b": torch.randn(6, 4)}
    fig = plot_svd_errors(matrices, rank=2)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    curve_a = ax.get_lines()[0]
    assert list(curve_a.get_ydata()) == pytest.approx(svd_relative_errors(matrices["a"]).tolist())
    assert ax.get_title() == "best rank-2 approximation (truncated SVD)"


def test_plot_update_size_draws_the_three_rules_with_their_spread():
    fig = plot_update_size(rank=4, alpha=8, ranks=(1, 4, 16), steps=3, seeds=(0, 1))
    size_ax, drop_ax = fig.axes
    labels = [t.get_text() for t in size_ax.get_legend().get_texts()]
    assert labels == [
        "scaling = alpha/rank",
        "scaling = alpha/sqrt(rank)",
        "scaling = alpha",
    ]
    assert size_ax.get_ylabel() == "‖ΔW‖ after 3 Adam steps"
    assert drop_ax.get_ylabel() == "% of the loss removed in 3 steps"
    # the first line is the mean over the seeds of alpha/rank; a band spans the seeds
    runs = [
        [brief_training(r, 8, "alpha/rank", steps=3, seed=s) for r in (1, 4, 16)] for s in (0, 1)
    ]
    means = [(a.update_size + b.update_size) / 2 for a, b in zip(*runs, strict=True)]
    assert list(size_ax.get_lines()[0].get_ydata()) == pytest.approx(means)
    assert len(size_ax.collections) == len(drop_ax.collections) == 3


def test_plot_loss_spread_draws_the_mean_and_the_range():
    fig = plot_loss_spread({"a": [[1.0, 0.5], [3.0, 1.5]]}, "title")
    (ax,) = fig.axes
    assert list(ax.get_lines()[0].get_ydata()) == [2.0, 1.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (2 runs)"]
    (band,) = ax.collections
    vertices = band.get_paths()[0].vertices[:, 1]
    assert min(vertices) == 0.5
    assert max(vertices) == 3.0
    with pytest.raises(ValueError, match="one or more loss curves of the same length"):
        plot_loss_spread({"b": [[1.0], [1.0, 2.0]]}, "t")


def test_plot_losses():
    fig = plot_losses({"run": [1.0, 0.5, 0.25]}, "title")
    (ax,) = fig.axes
    assert list(ax.get_lines()[0].get_ydata()) == [1.0, 0.5, 0.25]
    assert ax.get_yscale() == "log"
    assert plot_losses({"run": [1.0]}, "t", log=False).axes[0].get_yscale() == "linear"


def test_plot_attention_patterns():
    fig = plot_attention_patterns({"before": torch.eye(4), "after": torch.eye(4)})
    assert [ax.get_title() for ax in fig.axes[:2]] == ["before", "after"]
    with pytest.raises(ValueError, match=r"expected square attention weights.*\(2, 4, 4\)"):
        plot_attention_patterns({"per head": torch.rand(2, 4, 4)})


@pytest.mark.parametrize("rank", [-1, 7, 2.0])
def test_plot_svd_errors_refuses_a_rank_no_matrix_has(rank):
    matrices = {"a": torch.randn(5, 8), "b": torch.randn(6, 4)}
    with pytest.raises(ValueError, match=r"rank must be an integer from 0 to 5 .* got"):
        plot_svd_errors(matrices, rank)
    assert not plt.get_fignums()  # no figure was drawn
    plot_svd_errors(matrices, 5)  # a rank that one matrix has is still drawn
