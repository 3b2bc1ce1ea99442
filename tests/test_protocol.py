"""lora_helpers.protocol: spreads over seeds, honest verdicts, per-method learning rates, tables."""

import math
import types
from dataclasses import dataclass

import pytest
import torch

from lora_helpers import protocol
from lora_helpers.protocol import Spread, Tuned


@dataclass
class FakeRun:
    """What tune() needs from a run: its validation loss; plus what tables read."""

    lr: float
    seed: int
    val_loss: float
    heldout_loss: float = 0.0


class FakeTrainer:
    """run(lr, seed) for tune(): validation loss from a table, every call recorded."""

    def __init__(self, losses: dict[float, float], seed_offset: float = 0.0) -> None:
        self.losses, self.seed_offset, self.calls = losses, seed_offset, []

    def __call__(self, lr: float, seed: int) -> FakeRun:
        self.calls.append((lr, seed))
        loss = self.losses[lr] + self.seed_offset * seed
        return FakeRun(lr, seed, loss, heldout_loss=10 * loss)


# --- Spread ---------------------------------------------------------------------------------


def test_spread_mean_low_high():
    s = protocol.spread([3, 1, 2.5])
    assert isinstance(s, Spread)
    assert s.values == (3.0, 1.0, 2.5)
    assert all(isinstance(v, float) for v in s.values)
    assert s.mean == pytest.approx(6.5 / 3)
    assert (s.low, s.high) == (1.0, 3.0)


def test_spread_of_one_value():
    s = protocol.spread([0.25])
    assert s.mean == s.low == s.high == 0.25


def test_spread_format_and_str():
    s = protocol.spread([0.5, 0.25, 0.75])
    assert s.format() == "0.500 (0.250-0.750)"
    assert str(s) == s.format()
    assert s.format(".1f", scale=100) == "50.0 (25.0-75.0)"
    assert s.format(".2e") == "5.00e-01 (2.50e-01-7.50e-01)"


@pytest.mark.parametrize("empty", [[], ()])
def test_spread_of_nothing_raises(empty):
    with pytest.raises(ValueError, match="at least one value"):
        protocol.spread(empty)
    with pytest.raises(ValueError, match="at least one value"):
        Spread(())


# --- comparisons ----------------------------------------------------------------------------


def test_clearly_lower_needs_ranges_apart():
    a, b = protocol.spread([1, 2]), protocol.spread([3, 4])
    assert protocol.clearly_lower(a, b)
    assert not protocol.clearly_lower(b, a)
    overlapping = protocol.spread([1.5, 3.5])
    assert not protocol.clearly_lower(a, overlapping)
    assert not protocol.clearly_lower(overlapping, b)
    touching = protocol.spread([2, 3])  # a.high == touching.low: not every seed below
    assert not protocol.clearly_lower(a, touching)
    # a lower mean is not enough
    assert protocol.spread([0, 10]).mean < protocol.spread([5.5, 5.6]).mean
    assert not protocol.clearly_lower(protocol.spread([0, 10]), protocol.spread([5.5, 5.6]))


def test_verdict_a_lower():
    a, b = protocol.spread([1, 2]), protocol.spread([3, 4])
    assert protocol.verdict(a, b, "A", "B") == (
        "A has a lower loss than B in every seed (ranges do not overlap)."
    )


def test_verdict_b_lower_and_quantity():
    a, b = protocol.spread([3, 4]), protocol.spread([1, 2])
    assert protocol.verdict(a, b, "A", "B", "test loss") == (
        "B has a lower test loss than A in every seed (ranges do not overlap)."
    )


def test_verdict_within_the_spread():
    a, b = protocol.spread([1, 3]), protocol.spread([2, 4])
    assert protocol.verdict(a, b, "A", "B") == (
        "A and B are within the spread of each other "
        "(2.000 (1.000-3.000) against 3.000 (2.000-4.000)): no winner on this evidence."
    )


# --- tune -----------------------------------------------------------------------------------


def test_tune_picks_the_lowest_validation_loss_and_runs_every_seed_there():
    trainer = FakeTrainer({1e-3: 0.9, 1e-2: 0.4, 1e-1: 0.6}, seed_offset=0.01)
    tuned = protocol.tune("m", trainer, lrs=(1e-3, 1e-2, 1e-1), seeds=(5, 6, 7))
    assert isinstance(tuned, Tuned)
    assert tuned.name == "m"
    assert tuned.lr == 1e-2
    # the grid is scored with the first seed only
    assert tuned.lr_scores == pytest.approx({1e-3: 0.95, 1e-2: 0.45, 1e-1: 0.65})
    assert list(tuned.lr_scores) == [1e-3, 1e-2, 1e-1]
    assert [(r.lr, r.seed) for r in tuned.runs] == [(1e-2, 5), (1e-2, 6), (1e-2, 7)]
    # len(lrs) + len(seeds) - 1 runs: the first seed's run at the pick is reused
    assert len(trainer.calls) == 3 + 3 - 1
    assert trainer.calls == [(1e-3, 5), (1e-2, 5), (1e-1, 5), (1e-2, 6), (1e-2, 7)]
    assert tuned.spread("val_loss").values == pytest.approx((0.45, 0.46, 0.47))
    assert tuned.spread("heldout_loss", scale=0.1).mean == pytest.approx(0.46)


def test_tune_breaks_a_tie_towards_the_smaller_learning_rate():
    trainer = FakeTrainer({3e-2: 0.5, 1e-2: 0.5, 1e-1: 0.7})
    assert protocol.tune("m", trainer, lrs=(3e-2, 1e-2, 1e-1), seeds=(0,)).lr == 1e-2
    assert len(trainer.calls) == 3


@pytest.mark.parametrize(("n_lrs", "n_seeds"), [(1, 1), (1, 3), (4, 1), (2, 5)])
def test_tune_run_count(n_lrs, n_seeds):
    lrs = [10.0**-k for k in range(1, n_lrs + 1)]
    trainer = FakeTrainer({lr: lr for lr in lrs})
    tuned = protocol.tune("m", trainer, lrs=lrs, seeds=range(n_seeds))
    assert len(trainer.calls) == n_lrs + n_seeds - 1
    assert len(tuned.runs) == n_seeds
    assert tuned.lr == min(lrs)


def test_tune_uses_protocol_seeds_by_default():
    trainer = FakeTrainer({1e-2: 0.1})
    tuned = protocol.tune("m", trainer, lrs=(1e-2,))
    assert [r.seed for r in tuned.runs] == list(protocol.SEEDS)
    assert len(protocol.SEEDS) >= 3


def test_tune_skips_diverged_learning_rates():
    trainer = FakeTrainer({1e-2: 0.8, 1e-1: math.nan, 1.0: math.inf})
    tuned = protocol.tune("m", trainer, lrs=(1e-2, 1e-1, 1.0), seeds=(0, 1))
    assert tuned.lr == 1e-2
    assert math.isnan(tuned.lr_scores[1e-1])  # the grid still shows what happened


def test_tune_raises_when_every_learning_rate_diverged():
    trainer = FakeTrainer({1e-1: math.nan, 1.0: math.inf})
    with pytest.raises(ValueError, match=r"big: every learning rate in \[0\.1, 1\.0\] diverged"):
        protocol.tune("big", trainer, lrs=(1e-1, 1.0), seeds=(0, 1, 2))
    assert len(trainer.calls) == 2  # no seed ran after the grid failed


def test_tune_refuses_an_empty_grid_or_no_seeds():
    trainer = FakeTrainer({1e-2: 0.1})
    with pytest.raises(ValueError, match="at least one learning rate"):
        protocol.tune("m", trainer, lrs=(), seeds=(0,))
    with pytest.raises(ValueError, match="at least one seed"):
        protocol.tune("m", trainer, lrs=(1e-2,), seeds=())
    assert trainer.calls == []


@dataclass
class StepRun:
    """A run that says its best step, as studies.Run does (0: before training)."""

    val_loss: float
    best_step: int


def test_tune_does_not_pick_a_run_that_never_improved_on_step_0():
    # at step 0 every learning rate scores the untrained model: equal losses, best step 0
    runs = {1e3: StepRun(2.0, 0), 1e4: StepRun(2.0, 0)}
    with pytest.raises(ValueError, match=r"x: every learning rate .* never improved .* step 0"):
        protocol.tune("x", lambda lr, seed: runs[lr], (1e3, 1e4), seeds=(0,))
    runs[1e-2] = StepRun(1.5, 30)
    assert protocol.tune("x", lambda lr, seed: runs[lr], (1e-2, 1e3), seeds=(0,)).lr == 1e-2
    runs[1e-6] = StepRun(1.0, 0)  # a lower loss, but at step 0: not a trained run
    assert protocol.tune("x", lambda lr, seed: runs[lr], (1e-6, 1e-2), seeds=(0,)).lr == 1e-2


@pytest.mark.parametrize(
    ("lrs", "seeds", "message"),
    [
        (1e-2, (0,), r"lrs must be a sequence of learning rates, e\.g\. \(1e-2,\), got 0\.01"),
        ("1e-2", (0,), "lrs must be a sequence"),
        ((1e-2,), 0, r"seeds must be a sequence of ints"),
        ((1e-2,), (0.5,), r"seeds must be a sequence of ints"),
    ],
)
def test_tune_refuses_a_number_where_a_sequence_belongs(lrs, seeds, message):
    trainer = FakeTrainer({1e-2: 0.1})
    with pytest.raises(TypeError, match=message):
        protocol.tune("m", trainer, lrs, seeds)
    assert trainer.calls == []


def test_verdict_refuses_lists_and_names_spread():
    with pytest.raises(TypeError, match=r"got a list; wrap .* protocol\.spread\(values\)"):
        protocol.verdict([1, 2], [3, 4], "A", "B")


def test_tuned_grid_marks_the_pick():
    trainer = FakeTrainer({1e-2: 0.5, 3e-2: 0.25})
    tuned = protocol.tune("Q+V", trainer, lrs=(1e-2, 3e-2), seeds=(0,))
    assert tuned.grid() == (
        "Q+V: validation loss by learning rate  0.01: 0.500  0.03: 0.250*  (the largest tried)"
    )
    inside = protocol.tune(
        "Q+V", FakeTrainer({1e-2: 0.5, 3e-2: 0.25, 1e-1: 0.9}), (1e-2, 3e-2, 1e-1)
    )
    assert inside.grid().endswith("0.03: 0.250*  0.1: 0.900")  # not flagged inside the grid


def test_verdict_for_a_higher_is_better_quantity():
    high, low = protocol.spread([0.9, 0.95]), protocol.spread([0.5, 0.6])
    assert protocol.verdict(high, low, "A", "B", "accuracy", higher_is_better=True) == (
        "A has a higher accuracy than B in every seed (ranges do not overlap)."
    )
    assert protocol.verdict(low, high, "B", "A", "accuracy", higher_is_better=True) == (
        "A has a higher accuracy than B in every seed (ranges do not overlap)."
    )


# --- tables ---------------------------------------------------------------------------------


def test_format_table_aligns_columns():
    assert (
        protocol.format_table(["a", "bb"], [[1, 2], [333, 4]])
        == "  a  bb\n---  --\n  1   2\n333   4"
    )


def test_table_one_row_per_method_with_lr_and_spreads():
    rows = [
        Tuned("A", 0.01, {0.01: 0.5}, [FakeRun(0.01, s, 0.5, h) for s, h in enumerate((1, 2, 3))]),
        Tuned("BB", 0.03, {0.03: 0.5}, [FakeRun(0.03, s, 0.5, h) for s, h in enumerate((4, 4))]),
    ]
    assert protocol.table(rows, {"test loss": ("heldout_loss", ".1f", 1.0)}) == (
        "method    lr      test loss\n"
        "------  ----  -------------\n"
        "     A  0.01  2.0 (1.0-3.0)\n"
        "    BB  0.03  4.0 (4.0-4.0)"
    )
    scaled = protocol.table(rows[:1], {"x %": ("heldout_loss", ".0f", 100)}).splitlines()
    assert scaled[0].split() == ["method", "lr", "x", "%"]
    assert scaled[-1].split() == ["A", "0.01", "200", "(100-300)"]


def test_best_step_keeps_a_copy_of_the_lowest_loss_and_puts_it_back():
    weight = torch.nn.Parameter(torch.zeros(2))
    best = protocol.BestStep([weight])
    offered = []
    for step, loss in enumerate([0.5, 0.3, float("nan"), 0.3, 0.4]):
        with torch.no_grad():
            weight.fill_(step)
        offered.append(best.offer(step, loss))
    assert offered == [True, True, False, False, False]  # NaN and ties never replace the best
    assert (best.step, best.loss) == (1, 0.3)
    best.restore()
    assert weight.tolist() == [1.0, 1.0]
    assert best.state[0] is not weight  # a copy, not the live parameter


def test_best_step_refuses_to_restore_before_any_validation():
    with pytest.raises(ValueError, match="validate at least once"):
        protocol.BestStep([]).restore()


def test_a_numpy_grid_of_learning_rates_is_a_sequence_too():
    np = pytest.importorskip("numpy")

    def run(lr, seed):
        return types.SimpleNamespace(val_loss=abs(lr - 0.01), best_step=1)

    assert protocol.tune("x", run, np.array([0.001, 0.01]), seeds=(0, 1)).lr == 0.01
