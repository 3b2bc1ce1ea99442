"""Results that hold: the protocol every comparison in the series follows.

One training run is one sample. Its number depends on the seed (the initial A, the order
of the batches), on the learning rate it happened to get, and on when it was stopped. So
every comparison in notebooks 02-08 is made the same way:

1. **Several seeds.** Each setting runs with at least 3 seeds; we report the mean and the
   spread (smallest to largest), and plots show the spread as bars or bands.
2. **Each method at its own learning rate.** A small grid of learning rates is tried for
   each method, and the one with the lowest *validation* loss is kept. The grid and the
   pick are printed. (Comparing two methods at one shared learning rate mostly measures
   which of them that learning rate suits.)
3. **Scored at the best validation step** (early stopping): a run's numbers are those of
   the step where its validation loss was lowest, unless the lesson is training length.
4. **A difference is a difference only outside the spread.** "A beats B" is said only
   when every seed of A beats every seed of B (the two ranges do not overlap); otherwise
   the difference is within the spread, and the notebooks say so.

Validation data picks learning rates and steps; the *test* (held-out) data that the
tables report is used for nothing else.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Seeds used by default: three, the fewest that show a spread.
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Spread:
    """Values of one quantity over seeds: their mean, smallest and largest."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("A spread needs at least one value (one per seed).")

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def format(self, fmt: str = ".3f", scale: float = 1.0) -> str:
        """'mean (low-high)', each number formatted with `fmt` after multiplying by `scale`."""
        mean, low, high = (scale * v for v in (self.mean, self.low, self.high))
        return f"{mean:{fmt}} ({low:{fmt}}-{high:{fmt}})"

    def __str__(self) -> str:
        return self.format()


def spread(values: Sequence[float]) -> Spread:
    """The Spread of one number per seed; raises ValueError for an empty sequence."""
    return Spread(tuple(float(v) for v in values))


def clearly_lower(a: Spread, b: Spread) -> bool:
    """True when every seed of `a` is below every seed of `b`: the ranges do not overlap.

    Raises TypeError unless both are Spreads.
    """
    for value in (a, b):
        if not isinstance(value, Spread):
            raise TypeError(
                f"Expected two Spreads, got a {type(value).__name__}; wrap the per-seed values "
                "with protocol.spread(values)."
            )
    return a.high < b.low


def verdict(
    a: Spread,
    b: Spread,
    name_a: str,
    name_b: str,
    quantity: str = "loss",
    fmt: str = ".3f",
    *,
    higher_is_better: bool = False,
) -> str:
    """One sentence comparing two spreads, honest about overlap (lower is better unless told).

    Raises TypeError unless `a` and `b` are Spreads (protocol.spread(values) makes one).
    """
    word = "higher" if higher_is_better else "lower"
    first, second = (b, a) if higher_is_better else (a, b)
    if clearly_lower(first, second):
        return (
            f"{name_a} has a {word} {quantity} than {name_b} in every seed (ranges do not overlap)."
        )
    if clearly_lower(second, first):
        return (
            f"{name_b} has a {word} {quantity} than {name_a} in every seed (ranges do not overlap)."
        )
    return (
        f"{name_a} and {name_b} are within the spread of each other "
        f"({a.format(fmt)} against {b.format(fmt)}): no winner on this evidence."
    )


class BestStep:
    """Early stopping (rule 3): remembers the parameters of the step with the lowest validation loss.

    Call offer(step, loss) after each validation and restore() when training ends; the
    parameters then hold the best step's values. A NaN loss is never the best.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.step: int | None = None
        self.loss = math.inf
        self.state: list[torch.Tensor] | None = None

    def offer(self, step: int, loss: float) -> bool:
        """Keep a copy of the parameters if `loss` is the lowest so far; True when it is."""
        if not loss < self.loss:
            return False
        self.step, self.loss = step, loss
        self.state = [p.detach().clone() for p in self.params]
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the best step's values back; raises ValueError if no step was offered."""
        if self.state is None:
            raise ValueError("No validation loss was offered: validate at least once first.")
        for p, kept in zip(self.params, self.state, strict=True):
            p.copy_(kept)


@dataclass
class Tuned:
    """A method run at its picked learning rate, once per seed.

    lr_scores: mean validation loss of the tuning seed(s) at each learning rate of the grid.
    runs: one run object per seed at the picked learning rate (each has `val_loss`).
    """

    name: str
    lr: float
    lr_scores: dict[float, float]
    runs: list[Any]

    def spread(self, attribute: str, scale: float = 1.0) -> Spread:
        """The Spread over seeds of one attribute of the runs (e.g. "heldout_loss")."""
        return spread([scale * getattr(run, attribute) for run in self.runs])

    def grid(self) -> str:
        """The learning-rate grid and its validation losses, the pick marked with * (and flagged
        when it is the largest learning rate tried: a larger one might have validated better)."""
        cells = [
            f"{lr:g}: {score:.3f}{'*' if lr == self.lr else ''}"
            for lr, score in self.lr_scores.items()
        ]
        edge = "  (the largest tried)" if len(cells) > 1 and self.lr == max(self.lr_scores) else ""
        return f"{self.name}: validation loss by learning rate  " + "  ".join(cells) + edge


def tune(
    name: str,
    run: Callable[[float, int], Any],
    lrs: Sequence[float],
    seeds: Sequence[int] = SEEDS,
) -> Tuned:
    """Pick a learning rate on validation data, then run every seed at it.

    run(lr, seed) trains once and returns an object with a `val_loss` attribute (the
    validation loss at its best step) and, optionally, `best_step` (0: before training).
    Each learning rate of `lrs` is tried with the first seed; the lowest validation loss wins
    (ties: the smaller learning rate), and the other seeds then run at the pick. That is
    len(lrs) + len(seeds) - 1 runs. A run whose best step is 0 never improved on the
    untrained model (its learning rate is usually too large): it is never picked.

    Raises TypeError unless lrs is a sequence of numbers and seeds a sequence of ints.
    Raises ValueError for an empty grid, no seeds, or when at every learning rate the run
    has a non-finite validation loss or its best step is 0.
    """
    if not _sequence_of(lrs, numbers.Real):
        raise TypeError(f"lrs must be a sequence of learning rates, e.g. (1e-2,), got {lrs!r}.")
    if not _sequence_of(seeds, numbers.Integral):
        raise TypeError(f"seeds must be a sequence of ints, e.g. (0, 1, 2), got {seeds!r}.")
    if len(lrs) == 0:
        raise ValueError("Give at least one learning rate to try, e.g. lrs=(3e-3, 1e-2, 3e-2).")
    if len(seeds) == 0:
        raise ValueError("Give at least one seed; three or more show the spread.")
    first = {lr: run(lr, seeds[0]) for lr in lrs}
    scores = {lr: float(r.val_loss) for lr, r in first.items()}
    finite = {
        lr: s
        for lr, s in scores.items()
        if math.isfinite(s) and getattr(first[lr], "best_step", None) != 0
    }
    if not finite:
        raise ValueError(
            f"{name}: every learning rate in {list(lrs)} diverged or never improved on the "
            "untrained model (best step 0); try smaller ones."
        )
    best = min(finite, key=lambda lr: (finite[lr], lr))
    runs = [first[best], *(run(best, seed) for seed in seeds[1:])]
    return Tuned(name, best, scores, runs)


def _sequence_of(values: object, kind: type) -> bool:
    return (  # a list, a tuple or a numpy array
        not isinstance(values, str)
        and hasattr(values, "__len__")
        and hasattr(values, "__getitem__")
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)
    )


def table(rows: Sequence[Tuned], columns: dict[str, tuple[str, str, float]]) -> str:
    """One row per method: its picked lr and, per column, 'mean (low-high)' over seeds.

    columns: header -> (run attribute, format, scale), e.g.
    {"test loss": ("heldout_loss", ".3f", 1.0), "accuracy %": ("heldout_accuracy", ".1f", 100)}.
    """
    headers = ["method", "lr", *columns]
    body = [
        [t.name, f"{t.lr:g}"]
        + [t.spread(attr, scale).format(fmt) for attr, fmt, scale in columns.values()]
        for t in rows
    ]
    return format_table(headers, body)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
