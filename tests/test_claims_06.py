"""What notebook 06 concludes, checked at small size.

Each test asserts one conclusion of the prose of notebooks/06_rank_alpha_targets.ipynb (the
markdown after each table), with the notebook's settings unless its docstring says what was
shrunk; where something was shrunk, the claim was checked to hold at the notebook's size too.
Each asserts a relation with some margin, not a number; they pass with the default CPU kernels
and with ATEN_CPU_CAPABILITY=default (runs at a large scaling are chaotic enough that float64
round-off changes their digits from one CPU to another, so no test relies on those digits).
"""

import pytest

from lora_helpers import protocol, studies

#: The notebook's fine-tuning task: rename all 8 pairs, 20 % of the targets random, 64 sequences.
NOISY_TASK = studies.Task(shift=1, pairs=(0, 1, 2, 3, 4, 5, 6, 7), noise=0.2)


@pytest.fixture(scope="module")
def base(one_thread):
    return studies.pretrained_model()


@pytest.fixture(scope="module")
def noisy():
    return studies.make_splits(NOISY_TASK, 64)


@pytest.fixture(scope="module")
def fit(base, noisy):
    """The notebook's fit against rank (ranks 2, 4, 8, alpha = 2r, 200 steps, lr 1e-2, seeds 0-2)."""
    return studies.fit_by_rank(base, noisy, ranks=[2, 4, 8], scaling=2.0, steps=200)


def at_rank(fit: studies.RankFit, rank: int, which: str = "heldout_loss") -> protocol.Spread:
    return protocol.spread(getattr(fit, which)[:, fit.ranks.index(rank)].tolist())


@pytest.fixture(scope="module")
def targets(base):
    """The notebook's target comparison as it is: SHIFT_RENAME_TASK, 256 sequences, budget 768,
    every target set, lrs 3e-3 and 1e-2, 80 steps, seeds 0-2."""
    data = studies.make_splits(studies.SHIFT_RENAME_TASK, 256)
    results = studies.compare_targets(base, data, 768, lrs=(3e-3, 1e-2), steps=80)
    return {t.name: t for t in results}


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
    set, in every seed" (all four matrices and attention + MLP included)."""
    accuracy = {name: t.spread("heldout_accuracy") for name, t in targets.items()}
    for other, spread in accuracy.items():
        if other != "Q+V":
            assert protocol.clearly_lower(spread, accuracy["Q+V"]), (other, spread, accuracy["Q+V"])


def test_single_matrices_stay_far_from_solving_the_task(targets, base):
    """(d') "One matrix is not enough, however high its rank, and neither is {W_q, W_k}: they
    reach a quarter to a third of the positions (W_q, W_k, {W_q, W_k}) or about as many as the
    pretrained model (W_v, W_o)"."""
    accuracy = {name: t.spread("heldout_accuracy") for name, t in targets.items()}
    for name in ("Q", "K", "Q+K"):
        assert 0.2 < accuracy[name].low <= accuracy[name].high < 0.45, (name, accuracy[name])
    pretrained = studies.loss_and_accuracy(
        base, studies.make_splits(studies.SHIFT_RENAME_TASK, 1).test
    )[1]
    for name in ("V", "O"):
        assert accuracy[name].high < pretrained + 0.02, (name, accuracy[name], pretrained)


# --- alpha and its scaling rule -------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1, 4, 16])
def test_the_scaling_rule_only_relabels_alpha(base, noisy, alpha):
    """(e) "At rank 16, α under α/√r is the same run as 4α under α/r". Two independent runs
    (not the sweep, which shares them), shrunk to 30 steps; they match bit for bit."""
    sqrt = studies.lora_run(base, noisy, 16, alpha, rule="alpha/sqrt(r)", steps=30, seed=1)
    by_r = studies.lora_run(base, noisy, 16, 4 * alpha, rule="alpha/r", steps=30, seed=1)
    assert sqrt.curves.train == by_r.curves.train
    assert sqrt.curves.val == by_r.curves.val
    assert (sqrt.heldout_loss, sqrt.train_loss) == (by_r.heldout_loss, by_r.train_loss)
    # and it is a real identity: the same alpha under the other rule is a different run
    other = studies.lora_run(base, noisy, 16, alpha, rule="alpha/r", steps=30, seed=1)
    assert other.curves.train != sqrt.curves.train


def test_alpha_works_like_a_step_size(base, noisy):
    """(f) "At a fixed learning rate and step count, a small α leaves the training loss high":
    with the smallest α of the notebook's grid (1) the training loss is higher than with the
    largest (16) in every seed, at ranks 4 and 16 (rule α/r, lr 1e-2).
    Shrunk: 40 steps instead of 100, α in {1, 16} instead of {1, 4, 16}, one rule."""
    (sweep,) = studies.sweep_rank_alpha(
        base, noisy, ranks=[4, 16], alphas=[1, 16], rules=["alpha/r"], steps=40, lr=1e-2
    )
    for i, rank in enumerate(sweep.ranks):
        small = protocol.spread(sweep.train_loss[:, i, 0].tolist())
        mid = protocol.spread(sweep.train_loss[:, i, 1].tolist())
        assert protocol.clearly_lower(mid, small), (rank, mid, small)
