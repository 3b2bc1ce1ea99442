"""What notebooks 07 and 08 conclude, checked at small size where it holds there.

Each test asserts one conclusion of the prose (or the printed verdicts) of
notebooks/07_intrinsic_rank.ipynb or notebooks/08_beyond_lora.ipynb. The notebooks print each
verdict at their full size, computed, and nbval compares those printouts on every run: that
guards the notebooks' numbers. These tests guard the claims, with the notebooks' pretrained
model, task (rename 4 pairs), targets, alpha = 2r and learning rates, and with:

- each method at the learning rate the notebook picked from its grid (3e-3, 1e-2, 3e-2) on
  validation data instead of over the grid again: 3e-2 for every method of both notebooks
  except DoRA of rank 4 in 08 (1e-2; printed there);
- notebook 07 shrunk to 80 steps instead of 200, with 256 training sequences instead of 512
  and 128 validation and 256 test sequences instead of 256 and 1,024;
- notebook 08's rank-4 comparisons (LoRA of rank 4 and 5 against DoRA of rank 4, and the 4-bit
  base) shrunk to 30 steps instead of 150, with 64 training, 128 validation and 256 test
  sequences instead of 256, 256 and 1,024.
- notebook 08's task arithmetic shrunk to adapters of 80 steps instead of 200, trained on 64
  sequences (128 for validation) instead of 256, and scored on 512 test sequences instead of
  1,024.

Every shrunk claim holds in every triple of seeds 0-4 (the margins are in the docstrings). Notebook
08's rank-1 comparisons (LoRA of rank 1 and 2 against DoRA of rank 1, with and without trainable
magnitudes) run at the notebook's size (only the frozen-magnitude runs stop at 80 steps, which
keeps the same models). At every smaller size tried (32 or 64 sequences, 50 to 150 steps), DoRA
with frozen magnitudes no longer loses to both LoRA and DoRA of rank 1 in seeds 0-2, or does so
only as narrowly as at the notebook's size, where it fails in every triple of seeds 0-4 that
includes seed 4 (frozen: 0.596, below LoRA's seed 2 at 0.624): those verdicts hold for seeds 0-2,
the seeds the notebook uses, and no smaller size makes them hold for more.

The grids stop at 3e-2 because runs at 0.1 and above are chaotic: their results change in
visible digits with the CPU's rounding. The runs here are not; the studies run in float64 and
these tests pass with ATEN_CPU_CAPABILITY=default too.
"""

import copy

import pytest
import torch

from lora_helpers import protocol, quant, studies
from lora_helpers.adapters import combine_lora_states
from lora_helpers.dora import dora_layers, mark_only_dora_as_trainable, replace_linear_with_dora
from lora_helpers.lora import (
    count_parameters,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
)

#: The learning rate both notebooks picked for every method from (3e-3, 1e-2, 3e-2) ...
LR = 3e-2
#: ... except for DoRA of rank 4 in notebook 08.
LR_DORA_RANK_4 = 1e-2

#: Notebook 07: full fine-tuning and LoRA (alpha = 2r) of the six matrices, kept at the best
#: validation step. Shrunk: 80 steps, 256 training sequences (the notebook: 200 and 512).
STEPS_07 = 80
RANKS_07 = (1, 2, 4, 8)

#: Notebook 08: adapters (alpha = 2r) on the four attention matrices, 256 sequences, up to
#: 150 steps kept at the best validation step; the rank-4 comparisons shrunk to 30 steps.
ATTENTION = ["Q", "K", "V", "O"]
STEPS_08 = 150
STEPS_08_RANK_4 = 30
#: DoRA of rank 1 with frozen magnitudes stops improving early: at 150 steps its best
#: validation step is 50 in each of seeds 0-2, so 80 steps keep the same model.
STEPS_08_FROZEN = 80


def loss_spread(runs):
    return protocol.spread([run.heldout_loss for run in runs])


def neither_clearly_lower(a, b):
    return not protocol.clearly_lower(a, b) and not protocol.clearly_lower(b, a)


@pytest.fixture(scope="module")
def base(one_thread, toy_base):
    """The pretrained model of notebooks 06-08 (conftest's toy_base), on one thread."""
    return toy_base


# --- notebook 07 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rename_07():
    """Notebook 07's task, shrunk: 256 training, 128 validation and 256 test sequences."""
    return studies.make_splits(studies.RENAME_TASK, 256, n_val=128, n_test=256)


@pytest.fixture(scope="module")
def full(base, rename_07):
    """Notebook 07's full fine-tuning at its picked learning rate, seeds 0-2."""
    return [
        studies.full_finetune_run(base, rename_07, lr=LR, seed=seed, steps=STEPS_07)
        for seed in protocol.SEEDS
    ]


@pytest.fixture(scope="module")
def lora_07(base, rename_07):
    """Notebook 07's LoRA runs (six matrices, alpha = 2r) at ranks 1, 2, 4, 8, seeds 0-2."""
    return {
        r: [
            studies.lora_run(
                base,
                rename_07,
                r,
                2 * r,
                targets=list(studies.LINEAR_NAMES),
                lr=LR,
                seed=seed,
                steps=STEPS_07,
            )
            for seed in protocol.SEEDS
        ]
        for r in RANKS_07
    }


@pytest.fixture(scope="module")
def cut_losses(base, rename_07, full):
    """Test loss of the seed-0 full update cut to its best rank-r approximation, per rank."""
    deltas = studies.weight_deltas(base, full[0].model)
    cut = studies.evaluate_truncated(base, deltas, rename_07.test, RANKS_07)
    return {r: loss for r, (loss, _) in zip(RANKS_07, cut, strict=True)}


def test_full_finetuning_test_loss(full):
    """'full fine-tuning (6,144 trainable numbers, lr 0.03): test loss 0.0034 (0.0031-0.0037),
    accuracy 100.0 (100.0-100.0) %': it learns the task. After 80 steps, over seeds 0-4, test
    loss 0.0063-0.0083 (the pretrained model: 5.27) and at most one test position wrong."""
    assert loss_spread(full).high < 0.01
    assert protocol.spread([run.heldout_accuracy for run in full]).low > 0.995
    assert full[0].trainable == 6 * 32 * 32


def test_norms_of_orthogonal_parts_add_in_squares(base, full):
    """'The part cut off and the part kept are orthogonal, so their norms add in squares':
    kept² + cut-off² = 1 (as fractions of ‖ΔW‖) for the truncated SVD of every real ΔW of the
    seed-0 full fine-tuning, at ranks 1, 2, 4 and 8; at rank 4 the means over the six layers
    (0.83 kept and 0.56 cut off in the notebook, 0.82 and 0.57 here) add up to well over 1."""
    deltas = studies.weight_deltas(base, full[0].model)
    for r in RANKS_07:
        kept, cut = [], []
        for key, delta in deltas.items():
            approx = studies.best_rank_approx(delta, r)
            kept.append((approx.norm() / delta.norm()).item())
            cut.append(((delta - approx).norm() / delta.norm()).item())
            assert kept[-1] ** 2 + cut[-1] ** 2 == pytest.approx(1.0, abs=1e-9), (key, r)
            energy = studies.energy_in_top(torch.linalg.svdvals(delta), r)
            assert kept[-1] ** 2 == pytest.approx(energy, abs=1e-9), (key, r)
        if r == 4:
            mean_kept, mean_cut = sum(kept) / len(kept), sum(cut) / len(cut)
            assert 0.4 < mean_cut < 0.7, mean_cut  # a large part of the norm cut off ...
            assert mean_kept + mean_cut > 1.3, (mean_kept, mean_cut)  # ... yet most of it kept


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_full_finetuning_beats_lora_of_rank_1_2_and_4_in_every_seed(full, lora_07, rank):
    """'LoRA of rank 1, 2 and 4 has a higher test loss than full fine-tuning in every seed'
    (0.0031-0.0037 against 0.0224-0.0440, 0.0063-0.0093 and 0.0049-0.0061). After 80 steps,
    over every triple of seeds 0-4, LoRA's lowest is at least 5.4, 1.55 and 1.21 times full
    fine-tuning's highest."""
    full_loss, lora_loss = loss_spread(full), loss_spread(lora_07[rank])
    assert protocol.clearly_lower(full_loss, lora_loss), (full_loss, lora_loss)


def test_lora_rank_8_is_within_the_spread_of_full_finetuning(full, lora_07):
    """'rank 8 ... is within its spread' (0.0032-0.0034 against 0.0031-0.0037): neither range
    lies below the other (in every triple of seeds 0-4 after 80 steps too)."""
    full_loss, lora_loss = loss_spread(full), loss_spread(lora_07[8])
    assert neither_clearly_lower(full_loss, lora_loss), (full_loss, lora_loss)


@pytest.mark.parametrize("rank", RANKS_07)
def test_rank_r_lora_is_far_below_the_full_update_cut_to_rank_r(lora_07, cut_losses, rank):
    """'At every rank its test loss is well below the "cut loss" column': every seed of LoRA of
    rank r is more than twice below the seed-0 full update cut to rank r. The closest call is
    rank 8: after 80 steps 0.0070 at most over seeds 0-4 against 0.0185 (the notebook: 0.0034
    against 0.0159); at rank 1, 0.47 against 1.79."""
    lora_loss = loss_spread(lora_07[rank])
    assert lora_loss.high < cut_losses[rank] / 2, (lora_loss, cut_losses[rank])


@pytest.mark.parametrize("rank", RANKS_07)
def test_lora_update_is_farther_from_full_than_its_length_and_the_best_cut(
    base, full, lora_07, rank
):
    """'Its ΔW is farther from the full one than the full one is long (the distance column is
    above 1), much farther than the best rank-r approximation': the mean over the six layers
    of ‖ΔW_LoRA − ΔW_full‖ / ‖ΔW_full‖ (seed 0) against the same for the best rank-r
    approximation of ΔW_full (notebook: 1.23/0.86, 1.16/0.74, 1.31/0.56, 1.39/0.35 at ranks 1,
    2, 4, 8; after 80 steps: 1.42/0.86, 1.13/0.74, 1.32/0.57, 1.37/0.35)."""
    full_deltas = studies.weight_deltas(base, full[0].model)
    lora_deltas = studies.weight_deltas(base, lora_07[rank][0].model)
    distance = sum(
        ((lora_deltas[k] - d).norm() / d.norm()).item() for k, d in full_deltas.items()
    ) / len(full_deltas)
    best = sum(
        ((studies.best_rank_approx(d, rank) - d).norm() / d.norm()).item()
        for d in full_deltas.values()
    ) / len(full_deltas)
    assert distance > 1, distance
    assert distance > best, (distance, best)


# --- notebook 08 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rename_256():
    """Notebook 08's data as it is: 256 training, 256 validation and 1,024 test sequences."""
    return studies.make_splits(studies.RENAME_TASK, 256)


@pytest.fixture(scope="module")
def rename_64():
    """Notebook 08's data shrunk for the rank-4 comparisons: 64, 128 and 256 sequences."""
    return studies.make_splits(studies.RENAME_TASK, 64, n_val=128, n_test=256)


def lora_08(base, data, rank, seed, steps):
    return studies.lora_run(
        base, data, rank, 2 * rank, targets=ATTENTION, steps=steps, lr=LR, seed=seed
    )


def dora_08(base, data, rank, seed, steps, *, train_magnitude=True):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    replace_linear_with_dora(model, rank, 2 * rank, studies.module_names(ATTENTION))
    mark_only_dora_as_trainable(model)
    for _, layer in dora_layers(model):
        layer.m.requires_grad_(train_magnitude)
    lr = LR_DORA_RANK_4 if rank == 4 else LR
    return studies.train_run(model, data, label="DoRA", steps=steps, lr=lr, seed=seed)


@pytest.fixture(scope="module")
def rank_1(base, rename_256):
    """Test losses of notebook 08's LoRA of rank 1 and 2 and DoRA of rank 1, seeds 0-2, and of
    DoRA of rank 1 with frozen magnitudes (the 08 solutions, exercise 1), at the notebook's size
    (module docstring: with fewer steps or sequences the frozen variant's claim fails). The
    frozen variant runs STEPS_08_FROZEN steps; its best step stays well before the last."""

    def seeds(run, rank, steps=STEPS_08, **kwargs):
        return [run(base, rename_256, rank, seed, steps, **kwargs) for seed in protocol.SEEDS]

    frozen = seeds(dora_08, 1, STEPS_08_FROZEN, train_magnitude=False)
    assert max(run.curves.best_step for run in frozen) <= STEPS_08_FROZEN - 20, frozen
    return {
        "LoRA rank 1": loss_spread(seeds(lora_08, 1)),
        "LoRA rank 2": loss_spread(seeds(lora_08, 2)),
        "DoRA rank 1": loss_spread(seeds(dora_08, 1)),
        "DoRA rank 1, m frozen": loss_spread(frozen),
    }


@pytest.fixture(scope="module")
def rank_4(base, rename_64):
    """Test losses of notebook 08's LoRA of rank 4 and 5 and DoRA of rank 4, seeds 0-2, shrunk
    to 30 steps and 64 training sequences."""
    methods = [("LoRA", lora_08, r) for r in (4, 5)] + [("DoRA", dora_08, 4)]
    return {
        f"{name} rank {r}": loss_spread(
            [run(base, rename_64, r, seed, STEPS_08_RANK_4) for seed in protocol.SEEDS]
        )
        for name, run, r in methods
    }


def test_dora_rank_1_is_within_the_spread_of_lora_rank_1(rank_1):
    """'At rank 1, DoRA (384 numbers) has a lower mean test loss than LoRA of rank 1 (256), but
    the two are within the spread of each other' (0.3687 (0.1433-0.6464) against
    0.4686 (0.2222-0.6242)): neither beats the other in every seed."""
    dora, lora = rank_1["DoRA rank 1"], rank_1["LoRA rank 1"]
    assert dora.mean < lora.mean, (dora, lora)
    assert neither_clearly_lower(dora, lora), (dora, lora)


def test_lora_rank_2_beats_dora_rank_1_in_every_seed(rank_1):
    """'LoRA of rank 2 (512) beats DoRA of rank 1 in every seed' (0.0132-0.0308 against
    0.1433-0.6464)."""
    lora, dora = rank_1["LoRA rank 2"], rank_1["DoRA rank 1"]
    assert protocol.clearly_lower(lora, dora), (lora, dora)


def test_lora_rank_4_beats_dora_rank_4_in_every_seed(rank_4):
    """'At rank 4, LoRA of rank 4 (1,024), with fewer numbers, beats DoRA (1,152) in every
    seed' (0.0084-0.0117 against 0.0247-0.0297). After 30 steps DoRA's lowest is at least 4.0
    times LoRA's highest, over every triple of seeds 0-4."""
    lora, dora = rank_4["LoRA rank 4"], rank_4["DoRA rank 4"]
    assert protocol.clearly_lower(lora, dora), (lora, dora)


def test_lora_rank_5_beats_dora_rank_4_in_every_seed(rank_4):
    """'and so does LoRA of rank 5 (1,280)' (0.0063-0.0082 against 0.0247-0.0297). After 30
    steps DoRA's lowest is at least 6.5 times LoRA's highest, over every triple of seeds 0-4."""
    lora, dora = rank_4["LoRA rank 5"], rank_4["DoRA rank 4"]
    assert protocol.clearly_lower(lora, dora), (lora, dora)


def test_dora_with_frozen_magnitudes_loses_to_lora_and_to_dora(rank_1):
    """The 08 solutions, exercise 1: DoRA of rank 1 with m frozen, at DoRA's learning rate,
    'is higher than LoRA's of rank 1 in every seed, and DoRA with trainable magnitudes beats
    it in every seed too' (1.2484 (0.9314-1.6140) against 0.2222-0.6242 and 0.1433-0.6464)."""
    frozen_loss = rank_1["DoRA rank 1, m frozen"]
    assert protocol.clearly_lower(rank_1["LoRA rank 1"], frozen_loss), frozen_loss
    assert protocol.clearly_lower(rank_1["DoRA rank 1"], frozen_loss), frozen_loss


def test_lora_on_the_4bit_base_is_within_the_spread_of_the_float_base(base, rename_64, rank_4):
    """'On the 4-bit base, LoRA's test loss is within the spread of the float base's': LoRA
    rank 4 (alpha 8) on the attention matrices of the NF4-quantised base against the same on
    the float base, seeds 0-2 (0.0079-0.0146 against 0.0084-0.0117; after 30 steps on 64
    sequences the ranges overlap in every triple of seeds 0-4)."""
    q_model = copy.deepcopy(base)
    quant.quantize_linears(q_model.att)
    quant.quantize_linears(q_model.mlp)

    def qlora(seed):
        model = copy.deepcopy(q_model)
        torch.manual_seed(seed)
        quant.add_lora_to_quantized(model.att, rank=4, alpha=8)
        return studies.train_run(
            model, rename_64, label="QLoRA", steps=STEPS_08_RANK_4, lr=LR, seed=seed
        )

    q_loss = loss_spread([qlora(seed) for seed in protocol.SEEDS])
    f_loss = rank_4["LoRA rank 4"]
    assert neither_clearly_lower(q_loss, f_loss), (q_loss, f_loss)
    # and the two bases really differ: 4-bit rounding moved the frozen weights
    rounded = quant.dequantize_4bit(q_model.att.W_value.quantized, studies.DTYPE)
    assert (rounded - base.att.W_value.weight).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_dora_trains_256r_plus_128_numbers_against_loras_256r(base, rank):
    """'On these four 32 x 32 matrices, LoRA of rank r trains 256r numbers and DoRA of rank r
    trains 256r + 128' (the 128: one magnitude per output feature of each matrix)."""
    lora = replace_linear_with_lora(
        copy.deepcopy(base), rank, 2 * rank, studies.module_names(ATTENTION)
    )
    mark_only_lora_as_trainable(lora)
    dora = replace_linear_with_dora(
        copy.deepcopy(base), rank, 2 * rank, studies.module_names(ATTENTION)
    )
    mark_only_dora_as_trainable(dora)
    assert count_parameters(lora).trainable == 256 * rank
    assert count_parameters(dora).trainable == 256 * rank + 128


# --- notebook 08: task arithmetic -------------------------------------------------------------


@pytest.fixture(scope="module")
def task_arithmetic(base):
    """Notebook 08's adapters (LoRA rank 4, alpha 8, on the attention matrices), one per task and
    seed 0-2, shrunk to 80 steps on 64 sequences, and the accuracies (%) the notebook compares:
    the two rename adapters combined with each weight pair on *rename all 8 pairs*, and *look 2
    back* alone and summed with *rename 0-3* on *look 2 back and rename 0-3*. Keys: a weight
    pair with the test set ("all 8 pairs", "rename 0-3", "rename 4-7"), "look 2 back", "sum",
    and "base" (the pretrained model on all 8 pairs, one number). Over seeds 0-4 the pair
    (1, 1) scores 84.0-94.5 on all 8 pairs against at most 60.5 for any other weights, and the
    sum 50.8-67.9 against at most 42.4 for *look 2 back* alone."""
    tasks = {
        "rename 0-3": studies.RENAME_TASK,
        "rename 4-7": studies.Task(pairs=(4, 5, 6, 7)),
        "look 2 back": studies.Task(shift=2),
    }
    splits = {name: studies.make_splits(task, 64, n_val=128) for name, task in tasks.items()}
    all_pairs = studies.make_data(studies.Task(pairs=tuple(range(8))), 512, seed=2)
    both = studies.make_data(studies.SHIFT_RENAME_TASK, 512, seed=2)
    names = studies.module_names(ATTENTION)

    def accuracy(states, weights, data):
        rank = 4 * len(states)  # the combined layer: scaling 1 (alpha = rank)
        model = replace_linear_with_lora(copy.deepcopy(base), rank, rank, names)
        load_lora_state_dict(
            model, combine_lora_states(states, weights, scalings=[2.0] * len(states))
        )
        return 100 * studies.loss_and_accuracy(model, data)[1]

    on = {"all 8 pairs": all_pairs, "rename 0-3": splits["rename 0-3"].test}
    on["rename 4-7"] = splits["rename 4-7"].test
    scores: dict[object, list[float]] = {}
    for seed in protocol.SEEDS:
        adapters = {
            name: lora_state_dict(
                studies.lora_run(
                    base, splits[name], 4, 8, targets=ATTENTION, steps=80, seed=seed
                ).model
            )
            for name in tasks
        }
        pair = [adapters["rename 0-3"], adapters["rename 4-7"]]
        for weights in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 1.0)):
            for test_set, data in on.items():
                score = accuracy(pair, list(weights), data)
                scores.setdefault((weights, test_set), []).append(score)
        scores.setdefault("look 2 back", []).append(
            accuracy([adapters["look 2 back"]], [1.0], both)
        )
        summed = accuracy([adapters["rename 0-3"], adapters["look 2 back"]], [1.0, 1.0], both)
        scores.setdefault("sum", []).append(summed)
    base_score = 100 * studies.loss_and_accuracy(base, all_pairs)[1]
    return {key: protocol.spread(values) for key, values in scores.items()} | {"base": base_score}


@pytest.mark.parametrize("other", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_the_sum_of_two_rename_adapters_renames_all_8_pairs_best(task_arithmetic, other):
    """08: "the sum gets ... of *rename all 8 pairs* right, ... more than either adapter alone or
    the halved pair, in every seed"."""
    all_8 = "all 8 pairs"
    assert protocol.clearly_lower(task_arithmetic[other, all_8], task_arithmetic[(1.0, 1.0), all_8])


@pytest.mark.parametrize("alone", [(1.0, 0.0), (0.0, 1.0)])
def test_one_rename_adapter_alone_gets_about_half_of_all_8_pairs(task_arithmetic, alone):
    """08: "either adapter alone (about half: the pairs it knows)" on *rename all 8 pairs*.
    Over seeds 0-4: 49.6-50.2 (the notebook: 50.4 and 49.6)."""
    alone_score = task_arithmetic[alone, "all 8 pairs"]
    assert alone_score.low > 40, alone_score
    assert alone_score.high < 60, alone_score


def test_the_base_model_gets_none_of_all_8_pairs(task_arithmetic):
    """08: "the base model gets none" of *rename all 8 pairs*: it copies every token."""
    assert task_arithmetic["base"] == 0


@pytest.mark.parametrize("test_set", ["rename 0-3", "rename 4-7"])
def test_halved_pair_does_neither_renaming_reliably(task_arithmetic, test_set):
    """08: "With (0.5, 0.5) each update is halved and neither renaming is done reliably", while
    each adapter at weight 1 does its own. Over seeds 0-4 the halved pair scores 21.9-67.8 on
    the two renamings, each adapter 99.7-100.0 on its own. Halved, not the whole pair (1, 1):
    on all 8 pairs the halved pair scores 41.3-60.5, the whole pair 84.0-94.5."""
    own = (1.0, 0.0) if test_set == "rename 0-3" else (0.0, 1.0)
    halved = task_arithmetic[(0.5, 0.5), test_set]
    assert task_arithmetic[own, test_set].low > 95
    assert halved.high < 80
    assert protocol.clearly_lower(halved, task_arithmetic[own, test_set])
    all_8 = "all 8 pairs"
    assert protocol.clearly_lower(
        task_arithmetic[(0.5, 0.5), all_8], task_arithmetic[(1.0, 1.0), all_8]
    )


def test_rename_plus_look_2_back_beats_look_2_back_alone(task_arithmetic):
    """08: "Adding *rename* and *look 2 back* gives a model that does both for many more positions ...
    higher in every seed" than *look 2 back* alone."""
    assert protocol.clearly_lower(task_arithmetic["look 2 back"], task_arithmetic["sum"])
