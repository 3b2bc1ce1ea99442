"""lora_helpers.studies: the task, the runs behind notebooks 06 and 07, their sliders and plots."""

import copy
import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_helpers import protocol, studies
from lora_helpers.lora import (
    LinearWithLoRA,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
)

QKVO = ("Q", "K", "V", "O")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def base(one_thread, toy_base):
    return toy_base


@pytest.fixture(scope="module")
def data():
    task = studies.Task(pairs=(0, 1, 2, 3), noise=0.2)
    return studies.make_splits(task, 32, n_val=64, n_test=128)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def count_lora_runs(monkeypatch) -> list[tuple]:
    """Record the (rank, alpha, rule, seed) of every studies.lora_run call made through the module."""
    calls, real = [], studies.lora_run

    def counting(base, data, rank, alpha, **kwargs):
        calls.append((rank, alpha, kwargs.get("rule", "alpha/r"), kwargs.get("seed", 0)))
        return real(base, data, rank, alpha, **kwargs)

    monkeypatch.setattr(studies, "lora_run", counting)
    return calls


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


def test_make_splits_sizes_and_fixed_seeds():
    task = studies.Task(shift=2, pairs=(0, 5), noise=0.1)
    splits = studies.make_splits(task, 40)
    assert isinstance(splits, studies.Splits)
    assert [len(d.x) for d in (splits.train, splits.val, splits.test)] == [40, 256, 1024]
    small = studies.make_splits(task, 8, n_val=16, n_test=32)
    assert [len(d.y) for d in (small.train, small.val, small.test)] == [8, 16, 32]
    # the same data for a task, call after call: seeds 1, 3 and 2 (test clean)
    for got, want in [
        (splits.train, studies.make_data(task, 40, seed=1)),
        (splits.val, studies.make_data(task, 256, seed=3)),
        (splits.test, studies.make_data(task, 1024, seed=2, clean=True)),
    ]:
        assert torch.equal(got.x, want.x)
        assert torch.equal(got.y, want.y)
    # three different samples of sequences
    assert not torch.equal(splits.train.x, splits.val.x[:40])
    assert not torch.equal(splits.val.x, splits.test.x[:256])


def test_make_splits_test_is_clean_and_validation_noisy_like_training():
    task = studies.Task(pairs=(0, 1), noise=0.25)
    splits = studies.make_splits(task, 2000, n_val=2000, n_test=2000)
    truth = task.relabel()

    def wrong(d: studies.Data) -> float:
        return (d.y[:, 1:] != truth[d.x[:, :-1]]).float().mean().item()

    assert wrong(splits.test) == 0.0
    assert 0.2 < wrong(splits.train) < 0.25  # 25 % replaced, 1 in 16 by the right token
    assert 0.2 < wrong(splits.val) < 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shift": 0}, "shift must be in 1..7"),
        ({"shift": 8}, "shift must be in 1..7"),
        ({"pairs": (8,)}, "pairs must be distinct integers in 0..7"),
        ({"pairs": (1, 1)}, "pairs must be distinct"),
        ({"noise": 1.0}, r"noise must be in \[0, 1\)"),
        ({"shift": 1.5}, r"shift must be in 1\.\.7, an integer, got 1\.5"),
        ({"shift": "1"}, "shift must be in 1..7, an integer"),
        ({"pairs": 0}, r"as a tuple such as \(0, 1\)"),
        ({"pairs": (0.5,)}, "pairs must be distinct integers"),
        ({"pairs": "01"}, "pairs must be distinct integers"),
        ({"noise": "0.2"}, r"noise must be in \[0, 1\), a number, got '0\.2'"),
        ({"noise": True}, "noise must be in"),
    ],
)
def test_task_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        studies.Task(**kwargs)


def test_make_data_refuses_a_bad_size():
    with pytest.raises(
        ValueError, match="n must be a positive integer, got 0; it is the number of sequences"
    ):
        studies.make_data(studies.PRETRAIN_TASK, 0, seed=0)
    with pytest.raises(
        ValueError, match="n must be a positive integer, got 0; it is the number of sequences"
    ):
        studies.make_splits(studies.PRETRAIN_TASK, 0)


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
    assert studies.DTYPE == torch.float64
    assert all(p.dtype == studies.DTYPE for p in base.parameters())


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def data_folder(tmp_path, monkeypatch):
    """An empty data folder of its own (LORA_DATA_DIR), for the pretrained base's file."""
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path))
    return tmp_path


def test_the_pretrained_base_is_kept_and_loaded_bit_for_bit(data_folder, monkeypatch, one_thread):
    trained = _weights(studies.pretrained_model(seed=3, steps=20))
    after_training = torch.get_rng_state()
    (kept,) = (data_folder / "tiny-pretrained").iterdir()
    assert kept.name.startswith("seed3-steps20-")
    umask = os.umask(0)
    os.umask(umask)
    assert kept.stat().st_mode & 0o777 == 0o666 & ~umask  # others may read it, as umask says

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the kept file is good")

    monkeypatch.setattr(studies, "train", no_training)
    torch.manual_seed(123)  # loading must leave the same random state as training did
    loaded = studies.pretrained_model(seed=3, steps=20)
    assert _same(_weights(loaded), trained)
    assert torch.equal(torch.get_rng_state(), after_training)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training


def test_a_damaged_pretrained_file_is_trained_again_and_replaced(data_folder, capsys, one_thread):
    trained = _weights(studies.pretrained_model(seed=3, steps=20))
    (kept,) = (data_folder / "tiny-pretrained").iterdir()
    raw = bytearray(kept.read_bytes())
    raw[-5] ^= 0xFF  # one byte of the tensor data (the file ends with it)
    kept.write_bytes(bytes(raw))
    again = studies.pretrained_model(seed=3, steps=20)
    assert "checksum failed; training the base again" in capsys.readouterr().out
    assert _same(_weights(again), trained)
    assert [p.name for p in (data_folder / "tiny-pretrained").iterdir()] == [kept.name]
    assert _same(_weights(studies.pretrained_model(seed=3, steps=20)), trained)
    assert capsys.readouterr().out == ""  # the replaced file checks out

    kept.write_bytes(b"not a safetensors file")
    assert _same(_weights(studies.pretrained_model(seed=3, steps=20)), trained)
    assert "unreadable" in capsys.readouterr().out

    other = {
        "head.weight": torch.zeros(2, 2, dtype=studies.DTYPE)
    }  # a good checksum, wrong tensors
    save_file(other, str(kept), metadata={"sha256": studies._digest(other)})
    assert _same(_weights(studies.pretrained_model(seed=3, steps=20)), trained)
    assert "holds other tensors than this model's" in capsys.readouterr().out


def test_other_settings_get_their_own_file_and_a_read_only_folder_still_works(
    data_folder, monkeypatch, capsys, one_thread
):
    studies.pretrained_model(seed=3, steps=20)
    studies.pretrained_model(seed=3, steps=21)
    studies.pretrained_model(seed=4, steps=20)
    assert len(list((data_folder / "tiny-pretrained").iterdir())) == 3
    blocked = data_folder / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("LORA_DATA_DIR", str(blocked))  # mkdir under a file fails
    model = studies.pretrained_model(seed=3, steps=20)
    assert isinstance(model, studies.TinyTransformer)
    said = capsys.readouterr().out
    assert "Could not keep the pretrained base in" in said
    assert "set LORA_DATA_DIR to a writable folder" in said
    assert not list(data_folder.glob("**/*.part"))


def test_the_pretrained_base_does_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    """Trained on one thread whatever the caller's count (which comes back), so a file kept by
    a session on many threads holds the bits a one-thread run would give."""
    bits = {}
    for threads in (1, 2):
        monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / str(threads)))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            bits[threads] = _weights(studies.pretrained_model(seed=3, steps=60))
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(before)
    assert _same(bits[1], bits[2])


def test_module_names_and_unknown_names():
    assert studies.module_names(["Q", "MLP2"]) == ["att.W_query", "mlp.fc2"]
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['W'\]"):
        studies.module_names(["Q", "W"])


def test_train_refuses_a_frozen_model(data):
    with pytest.raises(ValueError, match="no trainable parameters"):
        studies.train(studies.TinyTransformer().requires_grad_(False), data.train, steps=1, lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -5}, "steps must be a positive integer, got -5"),
        ({"eval_every": 0}, "eval_every must be a positive integer, got 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ],
)
def test_train_refuses_counts_that_cannot_train(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        studies.train(studies.TinyTransformer(), data.train, **({"steps": 1, "lr": 0.1} | kwargs))


# --- training with early stopping -------------------------------------------------------------


def test_train_without_validation_keeps_nothing(base, data):
    model = copy.deepcopy(base)
    model.head.weight.requires_grad_(True)
    curves = studies.train(model, data.train, steps=5, lr=1e-2)
    assert len(curves.train) == 5
    assert curves.val == []
    assert curves.best is None
    assert curves.best_step == 5


def test_restoring_the_best_step_puts_back_its_parameters(base, data):
    model = copy.deepcopy(base)
    model.head.weight.requires_grad_(True)
    curves = studies.train(model, data.train, steps=40, lr=0.1, val=data.val, eval_every=4)
    assert [s for s, _ in curves.val] == [*range(0, 40, 4), 40]
    best_loss = min(v for _, v in curves.val)
    assert dict(curves.val)[curves.best_step] == best_loss
    assert 0 < curves.best_step < 40  # a real choice: neither the start nor the end
    assert curves.best.step == curves.best_step
    (kept,) = curves.best.state
    assert not torch.equal(kept, model.head.weight)  # the model ends elsewhere
    assert kept is not model.head.weight
    curves.best.restore()
    assert torch.equal(model.head.weight, kept)
    assert studies.loss_and_accuracy(model, data.val)[0] == pytest.approx(best_loss, rel=1e-12)
    with torch.no_grad():  # the kept state is a copy, not a view of the live parameters
        model.head.weight.zero_()
    assert kept.abs().sum() > 0


def test_lora_run_keeps_the_step_with_the_lowest_validation_loss(base, data):
    steps = 60
    run = studies.lora_run(base, data, rank=4, alpha=8, steps=steps, lr=3e-2, eval_every=5)
    val = dict(run.curves.val)
    assert list(val) == [*range(0, steps, 5), steps]
    assert run.val_loss == min(val.values())
    assert val[run.curves.best_step] == run.val_loss
    assert 0 < run.curves.best_step < steps  # at these settings the run overfits before the end
    # the returned model is the kept one: its losses are the run's numbers
    assert studies.loss_and_accuracy(run.model, data.val)[0] == pytest.approx(
        run.val_loss, rel=1e-12
    )
    loss, accuracy = studies.loss_and_accuracy(run.model, data.test)
    assert (loss, accuracy) == (run.heldout_loss, run.heldout_accuracy)
    assert studies.loss_and_accuracy(run.model, data.train)[0] == run.train_loss
    assert not run.model.training
    # last_heldout_loss: the same run trained to the end without stopping
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    replace_linear_with_lora(model, 4, 8, studies.module_names(QKVO))
    mark_only_lora_as_trainable(model)
    studies.train(model, data.train, steps=steps, lr=3e-2, seed=0)
    last = studies.loss_and_accuracy(model.eval(), data.test)[0]
    assert run.last_heldout_loss == pytest.approx(last, rel=1e-12)
    assert run.last_heldout_loss != run.heldout_loss


# --- LoRA runs, the slider and the sweeps (notebook 06) -----------------------------------------


def test_lora_run_trains_a_copy_and_reports(base, data):
    before = params(base)
    run = studies.lora_run(base, data, rank=2, alpha=4, steps=12, eval_every=5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert run.trainable == 4 * 2 * 64  # four 32 x 32 matrices, 2 * (32 + 32) each
    assert all(p.dtype == studies.DTYPE for p in run.model.parameters())
    assert len(run.curves.train) == 12
    assert [step for step, _ in run.curves.val] == [0, 5, 10, 12]
    assert run.lr == 1e-2
    for value in (run.train_loss, run.val_loss, run.heldout_loss, run.last_heldout_loss):
        assert math.isfinite(value)
    assert 0 <= run.heldout_accuracy <= 1
    assert run.val_loss < run.curves.val[0][1]  # training helped on validation data ...
    assert run.heldout_loss < studies.loss_and_accuracy(base, data.test)[0]  # ... and test data
    assert run.label == "LoRA, rank 2, alpha 4, alpha/r"


def test_lora_run_refuses_an_unknown_rule(base, data):
    with pytest.raises(ValueError, match="rule must be one of"):
        studies.lora_run(base, data, rank=2, alpha=4, rule="alpha", steps=1)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        studies.lora_run(base, data, rank=0, alpha=4, steps=1)  # was a ZeroDivisionError


def test_scaling_of():
    assert studies.scaling_of(4, 8, "alpha/r") == 2
    assert studies.scaling_of(4, 8, "alpha/sqrt(r)") == 4
    with pytest.raises(ValueError, match="rule must be one of"):
        studies.scaling_of(4, 8, "sqrt")


def test_rank_alpha_figure_is_the_slider_function(base, data):
    fig = studies.rank_alpha_figure(base, data, rank=16, alpha=8, rule="alpha/sqrt(r)")
    (ax,) = fig.axes
    assert ax.get_title() == "scaling = alpha/sqrt(r) = 2"
    assert len(ax.lines) == 3  # training curve, validation curve, kept step
    assert "test" in ax.get_legend().get_texts()[0].get_text()


def test_sweep_shapes_and_shared_runs(base, data, monkeypatch):
    calls = count_lora_runs(monkeypatch)
    sweeps = studies.sweep_rank_alpha(
        base, data, ranks=[1, 4], alphas=[2, 4, 8], steps=4, seeds=(0, 1)
    )
    assert [s.rule for s in sweeps] == list(studies.RULES)
    for sweep in sweeps:
        assert sweep.ranks == [1, 4]
        assert sweep.alphas == [2.0, 4.0, 8.0]
        assert sweep.train_loss.shape == sweep.heldout_loss.shape == (2, 2, 3)
        assert torch.isfinite(sweep.train_loss).all()
    by_r, by_sqrt = sweeps
    assert torch.equal(by_r.train_loss[:, 0], by_sqrt.train_loss[:, 0])  # rank 1: the same runs
    # rank 4: alpha 4 under alpha/sqrt(r) and alpha 8 under alpha/r both scale by 2, so the
    # sweep trains that run once; a separate run under alpha/sqrt(r) gives the same numbers
    assert torch.equal(by_sqrt.heldout_loss[:, 1, 1], by_r.heldout_loss[:, 1, 2])
    assert torch.equal(by_sqrt.heldout_loss[:, 1, 0], by_r.heldout_loss[:, 1, 1])  # scaling 1
    # per seed: 6 runs under alpha/r; alpha/sqrt(r) adds only rank 4, alpha 8 (scaling 4)
    assert len(calls) == 2 * 7
    assert len(set(calls)) == len(calls)
    assert sorted(c for c in calls if c[2] == "alpha/sqrt(r)") == [
        (4, 8, "alpha/sqrt(r)", 0),
        (4, 8, "alpha/sqrt(r)", 1),
    ]
    monkeypatch.undo()
    run = studies.lora_run(
        base, data, rank=4, alpha=4, rule="alpha/sqrt(r)", steps=4, eval_every=4, seed=1
    )
    assert run.heldout_loss == pytest.approx(by_sqrt.heldout_loss[1, 1, 1].item(), rel=1e-6)
    fig = studies.plot_sweeps(sweeps)
    assert len([ax for ax in fig.axes if ax.images]) == 4


def test_sweep_has_one_row_per_seed(base, data):
    (sweep,) = studies.sweep_rank_alpha(
        base, data, ranks=[2], alphas=[4], rules=["alpha/r"], steps=5, seeds=(3, 0)
    )
    assert sweep.heldout_loss.shape == (2, 1, 1)
    for s, seed in enumerate((3, 0)):
        run = studies.lora_run(base, data, rank=2, alpha=4, steps=5, seed=seed)
        assert sweep.train_loss[s, 0, 0].item() == pytest.approx(run.train_loss, rel=1e-6)
        assert sweep.heldout_loss[s, 0, 0].item() == pytest.approx(run.heldout_loss, rel=1e-6)
    assert sweep.heldout_loss[0, 0, 0] != sweep.heldout_loss[1, 0, 0]  # seeds differ


def test_sweep_uses_protocol_seeds_by_default(base, data, monkeypatch):
    calls = count_lora_runs(monkeypatch)
    (sweep,) = studies.sweep_rank_alpha(
        base, data, ranks=[1], alphas=[2], rules=["alpha/r"], steps=1
    )
    assert sweep.train_loss.shape == (len(protocol.SEEDS), 1, 1)
    assert [c[3] for c in calls] == list(protocol.SEEDS)


def hand_sweep() -> studies.Sweep:
    """Rank 1: alpha 2 clearly best; rank 4: alpha 1 best by its mean, alpha 3 within its spread."""
    heldout = torch.tensor(
        [  # (seeds, ranks, alphas)
            [[2.0, 1.0, 3.0], [0.5, 0.9, 0.7]],
            [[2.1, 1.1, 3.0], [0.6, 0.9, 0.4]],
            [[2.2, 1.2, 3.0], [0.7, 0.9, 0.8]],
        ],
        dtype=torch.float64,
    )
    return studies.Sweep([1, 4], [1.0, 2.0, 3.0], "alpha/r", heldout + 1, heldout)


def test_best_alphas_names_the_best_alpha_and_says_whether_it_is_clear():
    assert studies.best_alphas(hand_sweep()) == [
        "rank  1: best alpha 2, test loss 1.100 (1.000-1.200), clearly ahead of the next best, "
        "alpha 1 (2.100 (2.000-2.200))",
        "rank  4: best alpha 1, test loss 0.600 (0.500-0.700), within the spread of alpha 3 "
        "(0.633 (0.400-0.800))",
    ]


def test_best_alphas_reads_test_loss_not_training_loss():
    sweep = hand_sweep()
    flipped = studies.Sweep(
        sweep.ranks, sweep.alphas, sweep.rule, sweep.heldout_loss, -sweep.heldout_loss
    )
    assert "best alpha 3" in studies.best_alphas(flipped)[0]


def test_fit_by_rank_shapes_and_plot(base, data):
    fit = studies.fit_by_rank(base, data, ranks=[1, 2], seeds=(0, 1, 2), steps=3)
    assert fit.ranks == [1, 2]
    for grid in (fit.train_loss, fit.heldout_loss, fit.last_heldout_loss):
        assert grid.shape == (3, 2)
        assert torch.isfinite(grid).all()
    (ax,) = studies.plot_fit_by_rank(fit).axes
    assert len(ax.containers) == 3  # test loss at the best step, after the last, training loss
    assert len(ax.get_legend().get_texts()) == 3


def test_fit_by_rank_rows_are_seeds_at_fixed_scaling(base, data):
    fit = studies.fit_by_rank(base, data, ranks=[4], scaling=0.5, seeds=(2, 0), steps=12)
    for s, seed in enumerate((2, 0)):
        run = studies.lora_run(base, data, rank=4, alpha=2, steps=12, seed=seed)  # alpha = 0.5 r
        assert fit.heldout_loss[s, 0].item() == pytest.approx(run.heldout_loss, rel=1e-6)
        assert fit.last_heldout_loss[s, 0].item() == pytest.approx(run.last_heldout_loss, rel=1e-6)
        assert fit.train_loss[s, 0].item() == pytest.approx(run.train_loss, rel=1e-6)
    assert fit.heldout_loss[0, 0] != fit.heldout_loss[1, 0]


def test_budget_ranks_spend_exactly_the_budget():
    ranks = studies.budget_ranks(768)
    assert ranks == {
        "Q": 12,
        "K": 12,
        "V": 12,
        "O": 12,
        "Q+K": 6,
        "Q+V": 6,
        "Q+K+V+O": 3,
        "attention+MLP": 2,
    }
    for name, rank in ranks.items():
        assert rank * len(studies.TARGET_SETS[name]) * 2 * studies.D_MODEL == 768


@pytest.mark.parametrize("budget", [100, 384, 64 * 33])
def test_budget_ranks_refuses_budgets_without_whole_ranks(budget):
    with pytest.raises(ValueError, match="use a multiple of 768"):
        studies.budget_ranks(budget)


def test_budget_ranks_says_when_a_multiple_gives_too_high_a_rank():
    with pytest.raises(
        ValueError, match=r"gives 'Q' rank 36, above 32.*multiple of 768 up to 2048"
    ):
        studies.budget_ranks(2304)  # 3 * 768: whole ranks, but 36 > 32 for a single layer


@pytest.mark.parametrize("budget", ["768", 768.0, 0, -768, True])
def test_budget_ranks_wants_a_positive_int(budget):
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        studies.budget_ranks(budget)


@pytest.mark.parametrize("sets", [[["Q"]], {"Q+V": "QV"}])
def test_budget_ranks_wants_a_dict_of_lists(sets):
    with pytest.raises(TypeError, match="target_sets must be a dict of name -> list"):
        studies.budget_ranks(768, sets)


def test_targets_table_needs_compare_targets_sets():
    tuned = protocol.Tuned("mine", 1e-2, {1e-2: 0.5}, [])
    with pytest.raises(ValueError, match="'mine' is not in target_sets; pass targets_table the"):
        studies.targets_table([tuned])


def test_compare_targets_at_equal_budget(base, data, monkeypatch):
    calls = count_lora_runs(monkeypatch)
    sets = {"V": ["V"], "Q+V": ["Q", "V"]}
    lrs = (1e-2, 3e-2)
    results = studies.compare_targets(
        base, data, 256, target_sets=sets, seeds=(0, 1), lrs=lrs, steps=3
    )
    assert all(isinstance(r, protocol.Tuned) for r in results)
    assert [r.name for r in results] == ["V", "Q+V"]
    assert len(calls) == 2 * (len(lrs) + 2 - 1)  # per set: the grid with seed 0, then seed 1
    assert [c[:2] for c in calls[:3]] == [(4, 8), (4, 8), (4, 8)]  # V: rank 4, alpha 2 r
    assert [c[:2] for c in calls[3:]] == [(2, 4), (2, 4), (2, 4)]  # Q+V: rank 2
    for r in results:
        assert r.lr in lrs
        assert list(r.lr_scores) == list(lrs)
        assert r.lr_scores[r.lr] == min(r.lr_scores.values())
        assert len(r.runs) == 2
        assert all(run.trainable == 256 and run.lr == r.lr for run in r.runs)
        assert r.lr_scores[r.lr] == r.runs[0].val_loss  # the tuning run is reused for seed 0
        assert r.runs[0].heldout_loss != r.runs[1].heldout_loss
    table = studies.targets_table(results).splitlines()
    assert len(table) == 4
    assert table[0].split()[:4] == ["adapted", "rank", "parameters", "lr"]
    assert table[2].split()[:4] == ["V", "4", "256", f"{results[0].lr:g}"]
    assert table[3].split()[:4] == ["Q+V", "2", "256", f"{results[1].lr:g}"]


def test_the_runs_refuse_the_wrong_data_and_lr_before_any_work(base, data, monkeypatch):
    monkeypatch.setattr(studies, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(TypeError, match="got a Data; pass the whole make_splits"):
        studies.lora_run(base, data.train, 8, 16)
    with pytest.raises(TypeError, match="got a Data; pass the whole make_splits"):
        studies.full_finetune_run(base, data.train)
    with pytest.raises(ValueError, match="lr must be a positive number such as 1e-2, got '1e-2'"):
        studies.lora_run(base, data, 2, 2, lr="1e-2")
    with pytest.raises(TypeError, match=r"lrs must be a sequence"):
        studies.compare_targets(base, data, 768, lrs=1e-2)


def test_train_refuses_a_bad_lr_and_splits_for_data(base, data):
    model = copy.deepcopy(base).requires_grad_(True)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        studies.train(model, data.train, steps=1, lr=-1.0)
    with pytest.raises(TypeError, match="got a Splits; pick one split"):
        studies.train(model, data, steps=1, lr=1e-2)


def test_loss_and_accuracy_names_the_split_to_pick(base, data):
    with pytest.raises(TypeError, match=r"data must be a Data .* got a Splits; pick one split"):
        studies.loss_and_accuracy(base, data)
    with pytest.raises(TypeError, match="heldout must be a Data"):
        studies.evaluate_truncated(base, {}, data, [1])


def test_sweeps_without_ranks_are_refused(base, data):
    with pytest.raises(ValueError, match="ranks is empty"):
        studies.sweep_rank_alpha(base, data, [], [1.0])
    empty = studies.Sweep([], [1.0], "alpha/r", torch.empty(3, 0, 1), torch.empty(3, 0, 1))
    with pytest.raises(ValueError, match="Nothing to plot"):
        studies.plot_sweeps([empty])


def test_a_run_says_its_best_step(base, data):
    run = studies.lora_run(base, data, 1, 1, steps=2, eval_every=1)
    assert run.best_step == run.curves.best_step


def test_format_table_is_the_protocols():
    assert studies.format_table is protocol.format_table


def test_plot_runs_draws_a_curve_pair_and_the_kept_step_per_run(base, data):
    runs = [studies.lora_run(base, data, rank=r, alpha=r, steps=3) for r in (1, 2)]
    (ax,) = studies.plot_runs(runs).axes
    assert len(ax.lines) == 6
    dot = ax.lines[2]
    assert list(dot.get_xdata()) == [runs[0].curves.best_step]
    assert list(dot.get_ydata()) == [runs[0].val_loss]


# --- intrinsic rank (notebook 07) ----------------------------------------------------------------


def test_full_finetune_trains_only_the_weight_matrices(base, data):
    run = studies.full_finetune_run(base, data, targets=["V", "O"], steps=3)
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.tensor([4.0, 3.0]), 0), "r must be a positive integer"),
        ((torch.tensor([4.0, 3.0]), -1), "r must be a positive integer"),
        ((torch.tensor([4.0, 3.0]), 1.5), "r must be a positive integer"),
        ((torch.eye(4), 2), r"pass torch\.linalg\.svdvals\(dW\), not dW itself"),
        ((torch.tensor([1.0, 3.0]), 1), "1-D and descending"),
        ((torch.zeros(4), 2), "dW is zero"),
    ],
)
def test_energy_in_top_refuses_what_is_not_a_spectrum(args, message):
    with pytest.raises(ValueError, match=message):
        studies.energy_in_top(*args)


@pytest.mark.parametrize("shape", [(32,), (1,), (1, 32), (32, 1)])
def test_with_deltas_refuses_a_delta_that_would_broadcast(base, shape):
    with pytest.raises(ValueError, match=r"dW of 'Q' must have the weight's shape \(32, 32\)"):
        studies.with_deltas(base, {"Q": torch.ones(shape, dtype=studies.DTYPE)})


def test_a_base_with_lora_is_refused_where_plain_weights_are_needed(base, data):
    with_lora = replace_linear_with_lora(copy.deepcopy(base), 2, 2, ["att.W_query"])
    zero = torch.zeros(32, 32, dtype=studies.DTYPE)
    with pytest.raises(ValueError, match=r"'Q' is a LinearWithLoRA, not a plain nn\.Linear"):
        studies.with_deltas(with_lora, {"Q": zero})
    with pytest.raises(ValueError, match=r"'Q' is a LinearWithLoRA, not a plain nn\.Linear"):
        studies.full_finetune_run(with_lora, data, steps=1)


def test_with_deltas_and_full_rank_truncation_restore_the_tuned_model(base, data):
    run = studies.full_finetune_run(base, data, steps=3)
    deltas = studies.weight_deltas(base, run.model)
    rebuilt = studies.with_deltas(base, deltas)
    x = data.test.x
    assert torch.allclose(rebuilt(x), run.model(x), atol=1e-10)
    (full_rank,) = studies.evaluate_truncated(base, deltas, data.test, [32])
    assert full_rank[0] == pytest.approx(run.heldout_loss, rel=1e-9)
    low = studies.evaluate_truncated(base, deltas, data.test, [1, 2])
    assert all(0 <= acc <= 1 for _, acc in low)


def test_spectra_and_loss_plots(base, data):
    d = {"V": torch.randn(32, 32), "O": torch.randn(32, 32)}
    left, right = studies.plot_spectra(d, mark=4).axes
    assert len(left.lines) == len(right.lines) == 3  # two layers and the marker
    seeds = [protocol.spread([0.7, 0.9]), protocol.spread([0.3, 0.5])]
    fig = studies.plot_loss_vs_rank([1, 2], {"a": [1.0, 0.5], "b": seeds}, {"ref": 0.3})
    (ax,) = fig.axes
    assert len(ax.containers) == 2  # one curve per entry, error bars where seeds were given
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1
    assert list(dashed[0].get_ydata()) == [0.3, 0.3]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"a", "b", "ref"}
