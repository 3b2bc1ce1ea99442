"""The figures added for notebooks 01 and 04: the LoRA module's picture and GPT-2's parameter shares."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from lora_helpers.gpt2 import GPTModel, gpt2_config, parameter_breakdown
from lora_helpers.plots import plot_lora_module, plot_parameter_shares


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_plot_lora_module_labels_both_paths_with_their_shapes():
    fig = plot_lora_module(d=768, k=512, rank=8)
    texts = " | ".join(t.get_text() for t in fig.axes[0].texts)
    for label in (
        "W\n768 × 512",
        "pretrained, frozen",
        "A: 8 × 512\nrandom",
        "B: 768 × 8",
        "r = 8",
    ):
        assert label in texts
    assert "× α/r" in texts
    assert "Figure 1" in fig._suptitle.get_text()


def test_plot_lora_module_rejects_a_rank_above_min_d_k():
    with pytest.raises(ValueError, match="rank 5 is larger than min"):
        plot_lora_module(d=4, k=3, rank=5)


def test_plot_parameter_shares_stacks_each_model_to_almost_100_percent():
    with torch.device("meta"):
        parts = {name: parameter_breakdown(GPTModel(gpt2_config(name))) for name in ("gpt2-small",)}
    fig = plot_parameter_shares(parts)
    (ax,) = fig.axes
    widths = [bar.get_width() for bar in ax.patches]
    assert len(widths) == 4  # four components, one model
    assert 99.9 < sum(widths) < 100  # layer norms, the small rest, are not drawn
    assert ax.get_title() == "Where GPT-2's parameters live"
