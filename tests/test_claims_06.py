"""What notebook 06 concludes, checked at small size where it holds there.

Each test asserts one conclusion of the prose of notebooks/06_rank_alpha_targets.ipynb (the
markdown after each table). The notebook prints each verdict at its full size, computed, and
nbval compares those printouts on every run: that guards the notebook's numbers. What was shrunk:

- the scaling rule (e) and alpha as a step size (f): 10 steps instead of 100, alpha in {1, 16}
  for (f), and small validation and test sets (64 sequences each) where only training matters;
- the target comparison (d) runs every set at the learning rate the notebook picked for it on
  validation data (1e-2 for every set) instead of over the grid (3e-3, 1e-2) again.

Two studies did not hold at any smaller size tried, so they run at the notebook's size:

- the fit against rank (a-c): with 16 to 48 noisy sequences instead of 64, or 120 steps instead
  of 200 (seven settings tried, 60 to 150 steps), rank 4 no longer over-trains in every one of
  seeds 0-2, or after the last step no longer beats rank 8 in every one;
- the target comparison (d): after 40 or 60 steps, or with 64 sequences instead of 256, {W_q, W_v}
  is not yet ahead of every other set in seeds 0-2; at the notebook's 80 steps and 256 sequences
  it is, in every triple of seeds 0-4.

The fit against rank holds for the notebook's seeds 0-2, but not for every triple of seeds 0-4
at any size tried, the notebook's included (rank 4's seed 3 is an outlier): its verdicts are
about seeds 0-2, the seeds the notebook uses. Each test asserts a relation, not a printed
number; runs at a large scaling are chaotic enough that float64 round-off changes their digits
from one CPU to another, so the notebook's grids, and these tests, stay below them.
"""

import pytest

from lora_helpers import protocol, studies

#: The notebook's fine-tuning task: rename all 8 pairs, 20 % of the targets random, 64 sequences.
NOISY_TASK = studies.Task(shift=1, pairs=(0, 1, 2, 3, 4, 5, 6, 7), noise=0.2)
#: The learning rate notebook 06 picked for every target set from (3e-3, 1e-2).
TARGETS_LR = 1e-2


@pytest.fixture(scope="module")
def base(one_thread, toy_base):
    return toy_base


@pytest.fixture(scope="module")
def noisy():
    return studies.make_splits(NOISY_TASK, 64)


@pytest.fixture(scope="module")
def noisy_small():
    """The notebook's 64 noisy training sequences, with 64 validation and 64 test sequences."""
    return studies.make_splits(NOISY_TASK, 64, n_val=64, n_test=64)


@pytest.fixture(scope="module")
def fit(base, noisy):
    """The notebook's fit against rank as it is (ranks 2, 4, 8, alpha = 2r, 200 steps, lr 1e-2,
    seeds 0-2): its claims did not hold at a smaller size (module docstring)."""
    return studies.fit_by_rank(base, noisy, ranks=[2, 4, 8], scaling=2.0, steps=200)


def at_rank(fit: studies.RankFit, rank: int, which: str = "heldout_loss") -> protocol.Spread:
    return protocol.spread(getattr(fit, which)[:, fit.ranks.index(rank)].tolist())


@pytest.fixture(scope="module")
def target_runs(base):
    """The notebook's target comparison (SHIFT_RENAME_TASK, 256 sequences, budget 768, every
    target set, 80 steps, seeds 0-2), each set at the learning rate the notebook picked for it
    (1e-2) instead of over the grid again: each set's runs, one per seed."""
    data = studies.make_splits(studies.SHIFT_RENAME_TASK, 256)
    return {
        name: [
            studies.lora_run(
                base,
                data,
                rank,
                2 * rank,
                targets=studies.TARGET_SETS[name],
                steps=80,
                lr=TARGETS_LR,
                seed=seed,
            )
            for seed in protocol.SEEDS
        ]
        for name, rank in studies.budget_ranks(768).items()
    }


@pytest.fixture(scope="module")
def targets(target_runs):
    """The test accuracy of each target set, over seeds."""
    return {
        name: protocol.spread([run.heldout_accuracy for run in runs])
        for name, runs in target_runs.items()
    }


@pytest.fixture(scope="module")
def target_losses(target_runs):
    """The test loss of each target set, over seeds."""
    return {
        name: protocol.spread([run.heldout_loss for run in runs])
        for name, runs in target_runs.items()
    }


# --- under- and over-fitting against rank ---------------------------------------------------


def test_low_rank_underfits_rank_4_beats_rank_2_in_every_seed(fit):
    """(a) "Ranks 1 and 2 leave both losses high ... rank 4 is lower than rank 2 in every seed"."""
    rank_2, rank_4 = at_rank(fit, 2), at_rank(fit, 4)
    assert protocol.clearly_lower(rank_4, rank_2), (rank_4, rank_2)
    # both losses high at rank 2: training and test loss above those of rank 4 in every seed
    assert protocol.clearly_lower(at_rank(fit, 4, "train_loss"), at_rank(fit, 2, "train_loss"))


def test_training_too_long_overfits_from_rank_4_up(fit):
    """(b) "From rank 4 up, the test loss after the last step is above that of the kept step in
    every seed", compared seed by seed."""
    for rank in (4, 8):
        i = fit.ranks.index(rank)
        best, last = fit.heldout_loss[:, i], fit.last_heldout_loss[:, i]
        assert (last > best).all(), f"rank {rank}: best {best.tolist()}, last {last.tolist()}"


def test_overtraining_costs_more_at_rank_8_than_at_rank_4(fit):
    """(b') "The damage is larger at rank 8 than at rank 4, and after the last step rank 4 beats
    rank 8 in every seed"."""
    damage = (fit.last_heldout_loss - fit.heldout_loss).mean(0)
    assert damage[fit.ranks.index(4)] < damage[fit.ranks.index(8)], damage
    last_4, last_8 = at_rank(fit, 4, "last_heldout_loss"), at_rank(fit, 8, "last_heldout_loss")
    assert protocol.clearly_lower(last_4, last_8), (last_4, last_8)


def test_with_early_stopping_ranks_4_and_8_are_within_the_spread(fit):
    """(c) "At their best validation step, ranks 4 and 8 are within the spread of each other"."""
    best_4, best_8 = at_rank(fit, 4), at_rank(fit, 8)
    assert not protocol.clearly_lower(best_4, best_8), (best_4, best_8)
    assert not protocol.clearly_lower(best_8, best_4), (best_4, best_8)


# --- which matrices at a fixed budget -------------------------------------------------------


def test_q_and_v_together_get_furthest_in_every_seed(targets):
    """(d) "W_q and W_v together at rank 6 get furthest: a higher test accuracy than every other
    set, in every seed" (all four matrices and attention + MLP included). Over every triple of
    seeds 0-4, {W_q, W_v}'s lowest is at least 4.9 points above the best other set's highest."""
    for other, spread in targets.items():
        if other != "Q+V":
            assert protocol.clearly_lower(spread, targets["Q+V"]), (other, spread, targets["Q+V"])


def test_the_sets_that_can_express_the_change_have_the_lower_test_loss(target_losses):
    """(d'') "In test loss they are within the spread of {W_q, W_v}, and all three are below
    every set that cannot express the change, in every seed, except {W_q, W_v} against W_o
    alone, whose loss is within its spread"; the summary's "one pair within the spread"."""
    loss = target_losses
    both_halves, one_half = ("Q+V", "Q+K+V+O", "attention+MLP"), ("Q", "K", "V", "O", "Q+K")
    within = {
        (good, other)
        for good in both_halves
        for other in one_half
        if not protocol.clearly_lower(loss[good], loss[other])
    }
    assert within == {("Q+V", "O")}, within
    assert not protocol.clearly_lower(loss["Q+V"], loss["O"])
    assert not protocol.clearly_lower(loss["O"], loss["Q+V"])
    for other in both_halves[1:]:
        assert not protocol.clearly_lower(loss["Q+V"], loss[other]), (other, loss)
        assert not protocol.clearly_lower(loss[other], loss["Q+V"]), (other, loss)


def test_single_matrices_stay_far_from_solving_the_task(targets, base):
    """(d') "One matrix is not enough, however high its rank, and neither is {W_q, W_k}: they
    reach a quarter to a third of the positions (W_q, W_k, {W_q, W_k}) or about as many as the
    pretrained model (W_v, W_o)"."""
    for name in ("Q", "K", "Q+K"):
        assert 0.2 < targets[name].low <= targets[name].high < 0.45, (name, targets[name])
    pretrained = studies.loss_and_accuracy(
        base, studies.make_splits(studies.SHIFT_RENAME_TASK, 1).test
    )[1]
    for name in ("V", "O"):
        assert targets[name].high < pretrained + 0.02, (name, targets[name], pretrained)


# --- alpha and its scaling rule -------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1, 4, 16])
def test_the_scaling_rule_only_relabels_alpha(base, noisy_small, alpha):
    """(e) "At rank 16, α under α/√r is the same run as 4α under α/r". Two independent runs
    (not the sweep, which shares them), shrunk to 10 steps; they match bit for bit."""
    sqrt = studies.lora_run(base, noisy_small, 16, alpha, rule="alpha/sqrt(r)", steps=10, seed=1)
    by_r = studies.lora_run(base, noisy_small, 16, 4 * alpha, rule="alpha/r", steps=10, seed=1)
    assert sqrt.curves.train == by_r.curves.train
    assert sqrt.curves.val == by_r.curves.val
    assert (sqrt.heldout_loss, sqrt.train_loss) == (by_r.heldout_loss, by_r.train_loss)
    # and it is a real identity: the same alpha under the other rule is a different run
    other = studies.lora_run(base, noisy_small, 16, alpha, rule="alpha/r", steps=10, seed=1)
    assert other.curves.train != sqrt.curves.train


def test_alpha_works_like_a_step_size(base, noisy_small):
    """(f) "At a fixed learning rate and step count, a small α leaves the training loss high":
    with the smallest α of the notebook's grid (1) the training loss is higher than with the
    largest (16) in every seed, at ranks 4 and 16 (rule α/r, lr 1e-2).
    Shrunk: 10 steps instead of 100, α in {1, 16} instead of {1, 4, 16}, one rule. Over seeds
    0-4, α = 1 leaves 9.46-9.52, α = 16 gets to 4.48-4.95."""
    (sweep,) = studies.sweep_rank_alpha(
        base, noisy_small, ranks=[4, 16], alphas=[1, 16], rules=["alpha/r"], steps=10, lr=1e-2
    )
    for i, rank in enumerate(sweep.ranks):
        small = protocol.spread(sweep.train_loss[:, i, 0].tolist())
        large = protocol.spread(sweep.train_loss[:, i, 1].tolist())
        assert protocol.clearly_lower(large, small), (rank, large, small)
