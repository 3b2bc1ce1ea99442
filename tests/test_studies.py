"""lora_helpers.studies: the task, the runs behind notebooks 06 and 07, their sliders and plots."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from lora_helpers import studies
from lora_helpers.lora import LinearWithLoRA


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return studies.pretrained_model()


@pytest.fixture(scope="module")
def data():
    task = studies.Task(pairs=(0, 1, 2, 3), noise=0.2)
    return studies.make_data(task, 32, seed=1), studies.make_data(task, 128, seed=2, clean=True)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the task -------------------------------------------------------------------------------


def test_relabel_swaps_the_chosen_pairs():
    table = studies.Task(pairs=(0, 3)).relabel()
    assert table.tolist() == [1, 0, 2, 3, 4, 5, 7, 6, *range(8, 16)]
    assert torch.equal(table[table], torch.arange(studies.VOCAB))  # swapping twice undoes it


def test_make_data_targets_follow_the_rule():
    task = studies.Task(shift=2, pairs=(1,))
    data = studies.make_data(task, 50, seed=0)
    assert data.x.shape == data.y.shape == (50, studies.CONTEXT)
    assert (data.y[:, :2] == studies.IGNORE).all()
    assert torch.equal(data.y[:, 2:], task.relabel()[data.x[:, :-2]])


def test_make_data_noise_only_in_training_data_and_seeded():
    task = studies.Task(noise=0.25)
    noisy = studies.make_data(task, 2000, seed=3)
    clean = studies.make_data(task, 2000, seed=3, clean=True)
    assert torch.equal(noisy.x, clean.x)
    assert torch.equal(clean.y[:, 1:], clean.x[:, :-1])
    wrong = (noisy.y[:, 1:] != clean.y[:, 1:]).float().mean().item()
    assert 0.2 < wrong < 0.25  # 25 % replaced, 1 in 16 of them by the right token
    assert torch.equal(studies.make_data(task, 2000, seed=3).y, noisy.y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shift": 0}, "shift must be in 1..7"),
        ({"shift": 8}, "shift must be in 1..7"),
        ({"pairs": (8,)}, "pairs must be distinct integers in 0..7"),
        ({"pairs": (1, 1)}, "pairs must be distinct"),
        ({"noise": 1.0}, r"noise must be in \[0, 1\)"),
    ],
)
def test_task_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        studies.Task(**kwargs)


def test_make_data_refuses_a_bad_size():
    with pytest.raises(ValueError, match="positive integer number of sequences"):
        studies.make_data(studies.PRETRAIN_TASK, 0, seed=0)


def test_tiny_transformer_shapes_and_layer_sizes():
    model = studies.TinyTransformer()
    logits = model(torch.zeros(3, studies.CONTEXT, dtype=torch.long))
    assert logits.shape == (3, studies.CONTEXT, studies.VOCAB)
    for name in studies.LINEAR_NAMES.values():
        assert model.get_submodule(name).weight.shape == (studies.D_MODEL, studies.D_MODEL)


def test_pretrained_model_solves_its_task_and_is_frozen(base):
    loss, accuracy = studies.loss_and_accuracy(
        base, studies.make_data(studies.PRETRAIN_TASK, 512, 9)
    )
    assert accuracy > 0.99
    assert loss < 0.05
    assert not any(p.requires_grad for p in base.parameters())
    assert not base.training


def test_module_names_and_unknown_names():
    assert studies.module_names(["Q", "MLP2"]) == ["att.W_query", "mlp.fc2"]
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['W'\]"):
        studies.module_names(["Q", "W"])


def test_train_refuses_a_frozen_model(data):
    with pytest.raises(ValueError, match="no trainable parameters"):
        studies.train(studies.TinyTransformer().requires_grad_(False), data[0], steps=1, lr=0.1)


# --- LoRA runs, the slider and the sweeps (notebook 06) -----------------------------------------


def test_lora_run_trains_a_copy_and_reports(base, data):
    before = params(base)
    run = studies.lora_run(base, *data, rank=2, alpha=4, steps=12, eval_every=5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert run.trainable == 4 * 2 * 64  # four 32 x 32 matrices, 2 * (32 + 32) each
    assert len(run.train_curve) == 12
    assert [step for step, _ in run.heldout_curve] == [0, 5, 10, 12]
    assert math.isfinite(run.train_loss)
    assert math.isfinite(run.heldout_loss)
    assert run.heldout_loss < run.heldout_curve[0][1]  # training helped
    assert run.label == "LoRA, rank 2, alpha 4, alpha/r"


def test_lora_run_refuses_an_unknown_rule(base, data):
    with pytest.raises(ValueError, match="rule must be one of"):
        studies.lora_run(base, *data, rank=2, alpha=4, rule="alpha", steps=1)


def test_scaling_of():
    assert studies.scaling_of(4, 8, "alpha/r") == 2
    assert studies.scaling_of(4, 8, "alpha/sqrt(r)") == 4
    with pytest.raises(ValueError, match="rule must be one of"):
        studies.scaling_of(4, 8, "sqrt")


def test_rank_alpha_figure_is_the_slider_function(base, data):
    fig = studies.rank_alpha_figure(base, *data, rank=16, alpha=8, rule="alpha/sqrt(r)")
    (ax,) = fig.axes
    assert ax.get_title() == "scaling = alpha/sqrt(r) = 2"
    assert len(ax.lines) == 2  # training and held-out curve
    assert "held-out" in ax.get_legend().get_texts()[0].get_text()


def test_sweep_shapes_and_shared_runs(base, data):
    sweeps = studies.sweep_rank_alpha(base, *data, ranks=[1, 4], alphas=[2, 4, 8], steps=4)
    assert [s.rule for s in sweeps] == list(studies.RULES)
    for sweep in sweeps:
        assert sweep.train_loss.shape == sweep.heldout_loss.shape == (2, 3)
        assert torch.isfinite(sweep.train_loss).all()
    by_r, by_sqrt = sweeps
    assert torch.equal(by_r.train_loss[0], by_sqrt.train_loss[0])  # rank 1: the same runs
    # rank 4: alpha 4 under alpha/sqrt(r) and alpha 8 under alpha/r both scale by 2, so the
    # sweep trains that run once; a separate run under alpha/sqrt(r) gives the same numbers
    assert by_sqrt.heldout_loss[1, 1] == by_r.heldout_loss[1, 2]
    run = studies.lora_run(
        base, *data, rank=4, alpha=4, rule="alpha/sqrt(r)", steps=4, eval_every=4
    )
    assert run.heldout_loss == pytest.approx(by_sqrt.heldout_loss[1, 1].item(), rel=1e-6)
    fig = studies.plot_sweeps(sweeps)
    assert len([ax for ax in fig.axes if ax.images]) == 4


def test_fit_by_rank_shapes_and_plot(base, data):
    fit = studies.fit_by_rank(base, *data, ranks=[1, 2], seeds=(0, 1, 2), steps=3)
    assert fit.train_loss.shape == fit.heldout_loss.shape == (3, 2)
    assert torch.isfinite(fit.heldout_loss).all()
    (ax,) = studies.plot_fit_by_rank(fit).axes
    assert len(ax.lines) == 2 * (1 + 3)  # a mean line and one dot row per seed, twice


def test_budget_ranks_spend_exactly_the_budget():
    ranks = studies.budget_ranks(768)
    assert ranks == {"Q": 12, "K": 12, "V": 12, "O": 12, "Q+V": 6, "Q+K+V+O": 3, "attention+MLP": 2}
    for name, rank in ranks.items():
        assert rank * len(studies.TARGET_SETS[name]) * 2 * studies.D_MODEL == 768


@pytest.mark.parametrize("budget", [100, 384, 64 * 33])
def test_budget_ranks_refuses_budgets_without_whole_ranks(budget):
    with pytest.raises(ValueError, match="use a multiple of 768"):
        studies.budget_ranks(budget)


def test_compare_targets_at_equal_budget(base, data):
    sets = {"V": ["V"], "Q+V": ["Q", "V"]}
    results = studies.compare_targets(base, *data, 256, target_sets=sets, seeds=(0, 1), steps=3)
    assert [(r.name, r.rank, r.trainable) for r in results] == [("V", 4, 256), ("Q+V", 2, 256)]
    assert all(len(r.heldout_loss) == 2 for r in results)
    table = studies.targets_table(results).splitlines()
    assert len(table) == 4
    assert table[2].split()[:3] == ["V", "4", "256"]


def test_format_table_aligns_columns():
    assert (
        studies.format_table(["a", "bb"], [[1, 2], [333, 4]])
        == "  a  bb\n---  --\n  1   2\n333   4"
    )


def test_plot_runs_draws_two_lines_per_run(base, data):
    runs = [studies.lora_run(base, *data, rank=r, alpha=r, steps=3) for r in (1, 2)]
    (ax,) = studies.plot_runs(runs).axes
    assert len(ax.lines) == 4


# --- intrinsic rank (notebook 07) ----------------------------------------------------------------


def test_full_finetune_trains_only_the_weight_matrices(base, data):
    run = studies.full_finetune_run(base, *data, targets=["V", "O"], steps=3)
    assert run.trainable == 2 * 32 * 32
    deltas = studies.weight_deltas(base, run.model)
    assert set(deltas) == set(studies.LINEAR_NAMES)
    assert deltas["V"].abs().sum() > 0
    assert deltas["Q"].abs().sum() == 0
    assert torch.equal(run.model.att.out_proj.bias, base.att.out_proj.bias)  # biases stay


def test_effective_weight_of_a_lora_layer_includes_its_update():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(8, 8), rank=2, alpha=2)
    with torch.no_grad():
        layer.lora.B.normal_()
    assert torch.allclose(
        studies.effective_weight(layer), layer.linear.weight + layer.lora.delta_weight()
    )
    layer.merge()
    with pytest.raises(TypeError, match="unmerged LinearWithLoRA"):
        studies.effective_weight(layer)


def test_energy_and_best_rank_approx_hand_cases():
    assert studies.energy_in_top(torch.tensor([4.0, 3.0]), 1) == pytest.approx(16 / 25)
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert torch.allclose(studies.best_rank_approx(d, 1), torch.diag(torch.tensor([3.0, 0.0, 0.0])))
    # Eckart-Young: the error of the best rank-2 approximation is the dropped singular value
    assert (d - studies.best_rank_approx(d, 2)).norm().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"r must be in 1\.\.3"):
        studies.best_rank_approx(d, 4)


def test_with_deltas_and_full_rank_truncation_restore_the_tuned_model(base, data):
    run = studies.full_finetune_run(base, *data, steps=3)
    deltas = studies.weight_deltas(base, run.model)
    rebuilt = studies.with_deltas(base, deltas)
    x = data[1].x
    assert torch.allclose(rebuilt(x), run.model(x), atol=1e-5)
    (full_rank,) = studies.evaluate_truncated(base, deltas, data[1], [32])
    assert full_rank[0] == pytest.approx(run.heldout_loss, rel=1e-4)
    low = studies.evaluate_truncated(base, deltas, data[1], [1, 2])
    assert all(0 <= acc <= 1 for _, acc in low)


def test_spectra_and_loss_plots(base, data):
    d = {"V": torch.randn(32, 32), "O": torch.randn(32, 32)}
    left, right = studies.plot_spectra(d, mark=4).axes
    assert len(left.lines) == len(right.lines) == 3  # two layers and the marker
    fig = studies.plot_loss_vs_rank([1, 2], {"a": [1.0, 0.5], "b": [0.8, 0.4]}, {"ref": 0.3})
    assert len(fig.axes[0].lines) == 3
