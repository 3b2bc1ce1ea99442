"""The conclusions that notebooks 02 and 03 (and their solutions) write, checked at small size.

Each test re-runs what one sentence of prose rests on and fails if that sentence would no longer
be true. The notebooks print each verdict at their full size, computed, and nbval compares those
printouts on every run: that guards the notebooks' numbers. These tests guard the claims, at a
size that runs in seconds. What was shrunk (each fixture and test says so again):

- 02's regression tasks have 128 training, validation and test samples instead of 512;
- each method runs at the learning rate its notebook picked on validation data, not over the grid
  again (Pitfall 2: 0.1, notebook 02's pick at rank 4);
- steps: 25 instead of 40 (Pitfall 2), 50 instead of 100 (solutions 02, exercise 4, learning rate
  0.01), 100 instead of 300 (notebook 03's adaptations and solutions 03), 200 instead of 300 (03's
  round-off check); ranks 1, 2 and 8 take 150 instead of 100, each step on a quarter of the data;
- one claim did not hold at any smaller size tried, so it runs at the notebook's size: solutions
  02, exercise 4, at learning rate 0.1 ("alpha / sqrt(rank) is within the spread of both").

Each shrunk claim was checked to hold in seeds 3 and 4 as well: those tested on seeds 0-2 in
every triple of seeds 0-4, with the margins the docstrings give; two claims of a spread ("within
the spread of each other") are tested, as the notebooks state them, on all five seeds. Runs are
float64 and seeded below the chaotic learning rates, so the outcome does not depend on the CPU's
kernels, the thread count or the torch version.
"""

import copy

import pytest
import torch

from lora_helpers import protocol
from lora_helpers.attention import add_lora_to_attention
from lora_helpers.explore import SCALING_RULES, brief_training
from lora_helpers.lora import count_parameters, mark_only_lora_as_trainable
from lora_helpers.toy_tasks import (
    CopyModel,
    adapt_copy_model,
    copy_accuracy,
    copy_attention_pattern,
    fit_lora,
    low_rank_change_task,
    train_copy_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = (0, 1, 2, 3, 4)  # the notebooks' seeds
FEW = (0, 1, 2)  # where five seeds of training would make a test slow: their first three
RANKS = (1, 4, 16, 64)
#: Shrunk: training, validation and test samples of 02's regression tasks (the notebook: 512).
SAMPLES = 128


def overlap(a: protocol.Spread, b: protocol.Spread) -> bool:
    return not (protocol.clearly_lower(a, b) or protocol.clearly_lower(b, a))


# --- 02: what alpha and the division by the rank do -------------------------------------------


def sizes(rule: str, seed: int, value: str) -> list[float]:
    return [getattr(brief_training(r, 16, rule, seed=seed), value) for r in RANKS]


def variation(values: list[float]) -> float:
    """How much a quantity changes across ranks: largest over smallest."""
    return max(values) / min(values)


@pytest.mark.parametrize("seed", SEEDS)
def test_sqrt_rank_keeps_the_update_size_steadiest_while_alpha_over_rank_shrinks_it(seed):
    by_rule = {rule: sizes(rule, seed, "update_size") for rule in SCALING_RULES}
    assert by_rule["alpha/rank"] == sorted(by_rule["alpha/rank"], reverse=True)  # shrinks
    assert by_rule["alpha"] == sorted(by_rule["alpha"])  # grows
    steadiest = min(SCALING_RULES, key=lambda rule: variation(by_rule[rule]))
    assert steadiest == "alpha/sqrt(rank)"


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_over_rank_keeps_the_progress_on_the_loss_steadiest(seed):
    by_rule = {rule: sizes(rule, seed, "loss_drop") for rule in SCALING_RULES}
    steadiest = min(SCALING_RULES, key=lambda rule: variation(by_rule[rule]))
    assert steadiest == "alpha/rank"
    # rank 64 removes more of the loss than rank 1 under every rule, most under alpha alone
    gains = {rule: by_rule[rule][-1] / by_rule[rule][0] for rule in SCALING_RULES}
    assert 1 < gains["alpha/rank"] < gains["alpha/sqrt(rank)"] < gains["alpha"]


@pytest.fixture(scope="module")
def tasks(one_thread):
    """02's rank-2 change of a 64 -> 64 layer, one task per seed; shrunk to 128 samples."""
    return {
        s: low_rank_change_task(64, 64, change_rank=2, n_samples=SAMPLES, seed=s) for s in SEEDS
    }


def test_rank_1_cannot_learn_a_rank_2_change_and_ranks_2_and_8_can(tasks):
    """Notebook 02: rank 1 "stays high ... far from the target"; ranks 2 and 8 reach test losses
    "thousands of times smaller in every seed", "close to the change", "within the spread of
    each other", over the notebook's five seeds (with three, ranks 2 and 8 overlap in some
    triples and not in others, at the notebook's size too). Shrunk: 128 samples, 150 steps (the
    notebook: 512, 100), at the learning rates notebook 02 picked on validation data. Here rank
    1's test loss is 0.21-0.57 and its relative error 0.54-0.72; ranks 2 and 8 are at least
    3,900 times lower, with a relative error of at most 0.0073."""
    fits = {
        rank: [fit_lora(tasks[s], rank, rank, steps=150, lr=lr, seed=s) for s in SEEDS]
        for rank, lr in ((1, 0.3), (2, 0.1), (8, 0.1))
    }
    test = {rank: protocol.spread([f.test_loss for f in runs]) for rank, runs in fits.items()}
    error = {rank: protocol.spread([f.delta_error for f in runs]) for rank, runs in fits.items()}
    assert test[1].low > 0.15  # "stays high"
    assert error[1].low > 0.5  # "far from the target"
    for rank in (2, 8):
        assert test[1].low > 1000 * test[rank].high  # "thousands of times smaller in every seed"
        assert error[rank].high < 0.0135  # "close to the change (relative error at most 0.013)"
    assert overlap(test[2], test[8])  # "within the spread of each other"


ALPHAS = {"alpha/rank": 8, "alpha/sqrt(rank)": 4, "alpha": 2}  # factor 2 at rank 4
#: The learning rate notebook 02 picked at rank 4 on validation data (grid 0.01, 0.03, 0.1, 0.3).
PITFALL_LR = 0.1


@pytest.fixture(scope="module")
def pitfall(tasks):
    """Notebook 02's Pitfall 2: rank 4 at the learning rate picked there (0.1), then ranks 16 and
    64 at that learning rate. Shrunk: 128 samples, 25 steps (the notebook: 512, 40), no grid."""

    def run(rank, rule, seed):
        return fit_lora(
            tasks[seed], rank, ALPHAS[rule], rule=rule, steps=25, lr=PITFALL_LR, seed=seed
        )

    runs = {("every rule", 4): [run(4, "alpha/rank", s) for s in FEW]}
    runs |= {(rule, r): [run(r, rule, s) for s in FEW] for rule in ALPHAS for r in (16, 64)}
    return runs


def test_the_three_rules_are_one_run_at_rank_4(tasks):
    fits = [fit_lora(tasks[0], 4, ALPHAS[rule], rule=rule, steps=5, lr=0.1) for rule in ALPHAS]
    assert fits[0].run.losses == fits[1].run.losses == fits[2].run.losses


def test_alpha_alone_and_sqrt_rank_overshoot_at_rank_64_and_alpha_over_rank_does_not(pitfall):
    """At this size, over seeds 0-4, the peak over the first loss is 24.7-40.9 for alpha alone
    and 3.18-5.85 for alpha / sqrt(rank) at rank 64 (the notebook: 18.8-28.7 and 2.18-4.13)."""
    peak = {key: protocol.spread([f.peak_ratio for f in fits]) for key, fits in pitfall.items()}
    assert peak["alpha", 64].low > 10  # "shoots above where it started" (23.2 times)
    assert peak["alpha/sqrt(rank)", 64].low > 1  # "overshoots too, less"
    assert peak["alpha/sqrt(rank)", 64].high < peak["alpha", 64].low
    assert peak["alpha/rank", 16].high == peak["alpha/rank", 64].high == 1  # never rises
    assert peak["every rule", 4].high == 1


def test_only_alpha_over_rank_keeps_the_test_loss_of_rank_4(pitfall):
    """At this size the lowest alpha / sqrt(rank) and alpha runs at rank 64 are at least 1.68
    and 10.3 times rank 4's highest, over every triple of seeds 0-4."""
    test = {key: protocol.spread([f.test_loss for f in fits]) for key, fits in pitfall.items()}
    at_rank_4 = test["every rule", 4]
    assert overlap(test["alpha/rank", 16], at_rank_4)
    assert overlap(test["alpha/rank", 64], at_rank_4)
    assert protocol.clearly_lower(at_rank_4, test["alpha/sqrt(rank)", 64])
    assert protocol.clearly_lower(at_rank_4, test["alpha", 64])


def full_rank_runs(n_samples: int, steps: int, lr: float):
    """Solutions 02, exercise 4: a change of rank 64 learned at rank 64 under each rule, seeds
    0-2: per rule, the spread of the test loss and of the peak over the first training loss."""
    tasks = {
        s: low_rank_change_task(64, 64, change_rank=64, n_samples=n_samples, seed=s) for s in FEW
    }
    runs = {}
    for rule, alpha in ALPHAS.items():
        fits = [fit_lora(tasks[s], 64, alpha, rule=rule, steps=steps, lr=lr, seed=s) for s in FEW]
        runs[rule] = (
            protocol.spread([f.test_loss for f in fits]),
            protocol.spread([f.peak_ratio for f in fits]),
        )
    return runs


def test_full_rank_change_at_a_small_learning_rate_the_biggest_steps_win(one_thread):
    """Shrunk: 128 samples, 50 steps (the exercise: 512, 100). Over every triple of seeds 0-4
    each rule is at least 3.1 times below the next (the exercise: 3.9 and 6.5 for seeds 0-2)."""
    runs = full_rank_runs(SAMPLES, steps=50, lr=0.01)
    assert protocol.clearly_lower(runs["alpha"][0], runs["alpha/sqrt(rank)"][0])
    assert protocol.clearly_lower(runs["alpha/sqrt(rank)"][0], runs["alpha/rank"][0])
    assert all(peak.high == 1 for _, peak in runs.values())


def test_full_rank_change_at_a_large_learning_rate_alpha_alone_falls_behind(one_thread):
    """At the exercise's size (512 samples, 100 steps): "alpha / sqrt(rank) is within the spread
    of both" comes from its seed 1, still at 2.6e-4 after 100 steps while the other runs reach
    1.4e-5 to 6.6e-5; with fewer steps or samples it beats alpha alone in every seed instead, so
    this claim did not hold at a smaller size."""
    runs = full_rank_runs(512, steps=100, lr=0.1)
    test = {rule: loss for rule, (loss, _) in runs.items()}
    assert min(test, key=lambda rule: test[rule].mean) == "alpha/rank"
    assert protocol.clearly_lower(test["alpha/rank"], test["alpha"])
    assert overlap(test["alpha/sqrt(rank)"], test["alpha/rank"])
    assert overlap(test["alpha/sqrt(rank)"], test["alpha"])
    assert runs["alpha"][1].low > 1  # overshoots in every seed
    assert runs["alpha/rank"][1].high == runs["alpha/sqrt(rank)"][1].high == 1


# --- 03: which attention projections move where attention looks -------------------------------


@pytest.fixture(scope="module")
def pretrained(one_thread) -> CopyModel:
    """Notebook 03's pretrained model: copies the token one place back."""
    torch.manual_seed(0)
    model = CopyModel(vocab_size=16, d_model=32, context_length=12, num_heads=2)
    train_copy_task(model, offset=1, steps=300, lr=3e-3)
    return model


CHOICES = {"qv": 4, "qkvo": 2, "vo": 4}  # 512 trainable parameters each
LR = {"qv": 0.01, "qkvo": 0.01, "vo": 0.005}  # what notebook 03 picked on validation data
#: Shrunk: Adam steps of each adaptation (notebook 03 and its solutions: 300).
STEPS = 100
#: "Learns the new task" at 100 steps: this share of the positions right in every seed (chance
#: is 6.25 %). Over seeds 0-4 the lowest are 69.6 % ({q,v} and {q,k,v,o}), 78.2 % ({k}) and
#: 72.1 % (three back); the notebook's 300 steps reach 95.4 % and more (its printout).
LEARNED = 0.6


def adapt(pretrained, which, *, rank=None, offset=2, lr=None, seeds=FEW):
    """One adaptation of notebook 03 at the learning rate it picked, for STEPS steps, once per
    seed: seeds 0-2 where a claim holds in every seed, the notebook's five for {q,v} and
    {q,k,v,o}, which it finds within the spread of each other over five seeds."""
    rank, lr = rank or CHOICES[which], lr or LR[which]
    return [
        adapt_copy_model(pretrained, which, rank, offset=offset, steps=STEPS, lr=lr, seed=s)
        for s in seeds
    ]


@pytest.fixture(scope="module")
def qv(pretrained):
    return adapt(pretrained, "qv", seeds=SEEDS)


@pytest.fixture(scope="module")
def qkvo(pretrained):
    return adapt(pretrained, "qkvo", seeds=SEEDS)


def test_the_pretrained_model_copies_one_back_and_is_at_chance_two_back(pretrained):
    assert copy_accuracy(pretrained, offset=1) == 1.0
    assert abs(copy_accuracy(pretrained, offset=2) - 1 / 16) < 0.01


def test_values_and_output_stay_near_chance_in_every_seed(pretrained):
    """'{v,o} stays near chance in every seed (6.0 % to 6.6 %)': after the same 100 steps that
    take {q,v} and {q,k,v,o} above 60 %, {v,o} is below 8 % (6.4 % to 7.2 % over seeds 0-4; chance
    6.25 %), and its attention pattern has not moved at all."""
    runs = adapt(pretrained, "vo")
    assert count_parameters(runs[0].model).trainable == 512
    assert protocol.spread([run.test_accuracy for run in runs]).high < 0.08
    for run in runs:  # and attention cannot move at all
        assert torch.equal(copy_attention_pattern(run.model), copy_attention_pattern(pretrained))


def test_queries_with_values_learn_the_new_task_in_every_seed(qv):
    """'{q,v} to between 95.4 % and 100.0 %' after 300 steps; after 100, above LEARNED."""
    assert count_parameters(qv[0].model).trainable == 512
    assert protocol.spread([run.test_accuracy for run in qv]).low > LEARNED


def test_all_four_at_half_the_rank_learn_the_new_task_in_every_seed(qkvo):
    """'{q,k,v,o} to between 96.7 % and 100.0 %' after 300 steps; after 100, above LEARNED."""
    assert count_parameters(qkvo[0].model).trainable == 512
    assert protocol.spread([run.test_accuracy for run in qkvo]).low > LEARNED


def test_queries_with_values_and_all_four_are_within_the_spread(qv, qkvo):
    """'Between {q, v} and {q, k, v, o} the test losses overlap' over the five seeds (after 100
    steps 0.54-1.13 against 0.27-1.14)."""
    losses = [protocol.spread([run.test_loss for run in runs]) for runs in (qv, qkvo)]
    assert overlap(*losses)


def test_in_seed_0_lora_on_q_moves_most_attention_two_back(qv, qkvo):
    """'In seed 0, LoRA on q moves most of the weight one diagonal further, to two places back
    (0.951 with {q,v}, 0.789 with all four)': after 100 steps 0.80 and 0.61, and what is left
    one place back (pretrained: 0.971; now 0.04 and 0.16) is under half of it."""
    rows = torch.arange(2, 12)
    for runs in (qv, qkvo):
        pattern = copy_attention_pattern(runs[0].model).mean(0)
        two_back, one_back = pattern[rows, rows - 2].mean(), pattern[rows, rows - 1].mean()
        assert two_back > 0.5
        assert one_back < two_back / 2


def perturbed_run(pretrained, lr: float, eps: float) -> float:
    """Validation loss of {q,v} seed 1 after 200 steps, its LoRA weights scaled by 1 + eps first."""
    model = copy.deepcopy(pretrained)
    torch.manual_seed(1)
    mark_only_lora_as_trainable(add_lora_to_attention(model, "qv", rank=4, alpha=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + eps)
    return train_copy_task(model, 2, steps=200, lr=lr, batch_size=32, seed=1).val_loss


@pytest.mark.parametrize(("lr", "chaotic"), [(0.03, True), (0.01, False)])
def test_above_the_grid_a_last_bit_change_grows_into_a_different_result(pretrained, lr, chaotic):
    """Why notebook 03's grid stops at 0.01: at 0.03 the result depends on round-off. Shrunk:
    200 steps instead of 300; the change at 0.03 is 5.0e-2 (the threshold: 1e-2), at 0.01 3e-13."""
    exact, nudged = perturbed_run(pretrained, lr, 0.0), perturbed_run(pretrained, lr, 1e-12)
    change = abs(nudged - exact) / exact
    assert (change > 1e-2) if chaotic else (change < 1e-6)


@pytest.mark.parametrize(("which", "rank", "offset"), [("k", 8, 2), ("qv", 4, 3)])
def test_keys_alone_and_three_back_are_learned_in_every_seed(pretrained, which, rank, offset):
    """Solutions 03, exercises 2 and 3 (seeds 0-2, learning rate 0.01): {k} alone at rank 8
    ("at least 97.5 %") and {q,v} three back ("at least 99.7 %") after 300 steps; after 100,
    above LEARNED in every seed."""
    runs = adapt(pretrained, which, rank=rank, offset=offset, lr=0.01)
    assert count_parameters(runs[0].model).trainable == 512
    assert min(run.test_accuracy for run in runs) > LEARNED
