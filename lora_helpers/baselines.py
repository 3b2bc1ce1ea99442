"""Baselines: what simple rules score on the spam task, so a fine-tuned model's accuracy has a yardstick.

Each one is fitted on the training rows only and then scored on validation and test:

- the **majority class**: always answer the label that is commonest in training;
- a **length rule**: "spam if a message has at least (or fewer than) t GPT-2 tokens", with
  the threshold t and the direction that are most accurate on the training rows;
- a **bag of words**: logistic regression on how often each GPT-2 token occurs in a message,
  with an L2 penalty, fitted full-batch in float64 (a convex problem: one answer, found the
  same way on every machine).

Messages are tokenized in full (not cut at the model's max_length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from .data import LABELS, Row, Splits

if TYPE_CHECKING:
    from tiktoken import Encoding


def _labels(labels: Sequence[int]) -> torch.Tensor:
    """Labels as a long tensor (n,) of 0 (ham) and 1 (spam); raises ValueError if empty or not 0/1."""
    y = torch.as_tensor(list(labels))  # no dtype yet: a label 0.5 must not become 0
    if y.numel() == 0:
        raise ValueError("A baseline needs at least one labelled row to fit; the split is empty.")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"Labels must be 0 (ham) or 1 (spam), got {sorted(set(y.tolist()))}.")
    return y.long()


def accuracy(predictions: torch.Tensor, labels: Sequence[int]) -> float:
    """Share of predictions (n,) equal to labels (n,); raises ValueError if the lengths differ."""
    y = _labels(labels)
    if predictions.shape != y.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {len(y)} labels; give one each.")
    return (predictions == y).double().mean().item()


# ----------------------------------------------------------------------------- majority


def majority_class(labels: Sequence[int]) -> int:
    """The commonest label among `labels` (training labels, 0 or 1); a tie goes to 0 (ham)."""
    return int(torch.bincount(_labels(labels), minlength=2).argmax())


# -------------------------------------------------------------------------- length rule


@dataclass(frozen=True)
class LengthRule:
    """Spam if a message has >= threshold tokens (spam_if_longer) or < threshold tokens (not)."""

    threshold: int
    spam_if_longer: bool = True

    def predict(self, lengths: torch.Tensor) -> torch.Tensor:
        """Labels (n,) for token counts (n,)."""
        longer = lengths >= self.threshold
        return (longer if self.spam_if_longer else ~longer).long()

    def __str__(self) -> str:
        sign = ">=" if self.spam_if_longer else "<"
        return f"spam if {sign} {self.threshold} tokens"


def fit_length_rule(lengths: Sequence[int], labels: Sequence[int]) -> LengthRule:
    """The threshold and direction with the highest accuracy on (lengths (n,), labels (n,)).

    Each length that occurs (and one past the longest) is tried as the threshold, in both
    directions; ties go to the smaller threshold, then to "spam if longer".
    Raises ValueError for empty or mismatched inputs.
    """
    y = _labels(labels)
    n = torch.as_tensor(list(lengths), dtype=torch.long)
    if n.shape != y.shape:
        raise ValueError(f"{len(n)} lengths for {len(y)} labels; give one length per label.")
    best, best_correct = LengthRule(int(n.min())), -1
    for threshold in [*sorted(set(n.tolist())), int(n.max()) + 1]:
        for longer in (True, False):
            rule = LengthRule(threshold, longer)
            correct = int((rule.predict(n) == y).sum())
            if correct > best_correct:
                best, best_correct = rule, correct
    return best


# ------------------------------------------------------------------------- bag of words


@dataclass
class BagOfWords:
    """Logistic regression on token counts: P(spam) = sigmoid(counts @ weight + bias).

    vocabulary maps a token id to its column; tokens not seen in training are ignored.
    """

    vocabulary: dict[int, int]
    weight: torch.Tensor  # (len(vocabulary),) float64
    bias: float

    def features(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token counts (n, len(vocabulary)), float64."""
        return count_matrix(token_lists, self.vocabulary)

    def logits(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Spam logits (n,), float64."""
        return self.features(token_lists) @ self.weight + self.bias

    def predict(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Labels (n,): 1 where the spam logit is positive."""
        return (self.logits(token_lists) > 0).long()


def count_matrix(token_lists: Sequence[Sequence[int]], vocabulary: dict[int, int]) -> torch.Tensor:
    """How often each vocabulary token occurs in each list: (n, len(vocabulary)), float64."""
    pairs = [
        (row, vocabulary[token])
        for row, tokens in enumerate(token_lists)
        for token in tokens
        if token in vocabulary
    ]
    counts = torch.zeros(len(token_lists), len(vocabulary), dtype=torch.float64)
    if pairs:
        rows, columns = torch.tensor(pairs).T
        counts.index_put_(
            (rows, columns), torch.ones(len(pairs), dtype=torch.float64), accumulate=True
        )
    return counts


def fit_bag_of_words(
    token_lists: Sequence[Sequence[int]],
    labels: Sequence[int],
    *,
    l2: float = 1e-3,
    max_iter: int = 500,
) -> BagOfWords:
    """Fit logistic regression on token counts of (token_lists (n lists), labels (n,)).

    Minimises mean cross-entropy + l2 * |weight|^2 (the bias is not penalised) with
    full-batch L-BFGS in float64, starting from zeros: no randomness, so every machine
    finds the same weights up to rounding. Raises ValueError for empty or mismatched
    inputs or a negative l2.
    """
    y = _labels(labels).double()
    if len(token_lists) != len(y):
        raise ValueError(f"{len(token_lists)} messages for {len(y)} labels; give one label each.")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}.")
    vocabulary = {t: i for i, t in enumerate(sorted({t for tokens in token_lists for t in tokens}))}
    x = count_matrix(token_lists, vocabulary)
    weight = torch.zeros(len(vocabulary), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return BagOfWords(vocabulary, weight.detach(), float(bias.detach()))


# ------------------------------------------------------------------------ all of them


class Baseline(NamedTuple):
    """A fitted baseline: what it does, in words, and predict(texts) -> labels (n,).

    predict raises TypeError unless texts is a list of str (one str: pass [text]).
    """

    rule: str
    predict: Callable[[Sequence[str]], torch.Tensor]


def _check_texts(texts: Sequence[str]) -> None:
    """Raise TypeError unless `texts` is a list of str (a single str would be read per character)."""
    if isinstance(texts, str):
        raise TypeError(
            f"predict takes a list of texts, got one str ({texts[:30]!r}); pass [text] instead."
        )
    if not all(isinstance(text, str) for text in texts):
        kind = next(type(text).__name__ for text in texts if not isinstance(text, str))
        raise TypeError(
            f"predict takes a list of texts (str), got one holding a {kind}; for rows "
            "(text, label) pass [text for text, _ in rows]."
        )


def _is_row(row: object) -> bool:
    return isinstance(row, tuple | list) and len(row) == 2 and isinstance(row[0], str)


def fit_baselines(rows: Sequence[Row], tokenizer: Encoding) -> dict[str, Baseline]:
    """The three baselines fitted on `rows` (the training rows (text, label)); the bag of
    words with fit_bag_of_words' default L2 penalty.

    Keys: "majority class", "length rule", "bag of words". Raises TypeError unless `rows`
    is a list of (text, label) pairs (the whole Splits: pass splits.train), ValueError if
    it is empty or has a label other than 0 or 1.
    """
    if isinstance(rows, Splits):
        raise TypeError(
            "fit_baselines takes the training rows, got the whole Splits; pass splits.train "
            "(baselines are fitted on training rows only)."
        )
    if isinstance(rows, str) or not all(_is_row(row) for row in rows):
        found = rows if isinstance(rows, str) else next(r for r in rows if not _is_row(r))
        raise TypeError(
            f"fit_baselines takes a list of (text, label) rows, but got {found!r:.60} where a "
            "row should be; pass the training rows, e.g. splits.train."
        )
    tokens = [tokenizer.encode_ordinary(text) for text, _ in rows]
    labels = [label for _, label in rows]
    majority = majority_class(labels)
    rule = fit_length_rule([len(t) for t in tokens], labels)
    bag = fit_bag_of_words(tokens, labels)

    def encode(texts: Sequence[str]) -> list[list[int]]:
        _check_texts(texts)
        return [tokenizer.encode_ordinary(text) for text in texts]

    def always(texts: Sequence[str]) -> torch.Tensor:
        _check_texts(texts)
        return torch.full((len(texts),), majority)

    return {
        "majority class": Baseline(f"always {LABELS[majority]}", always),
        "length rule": Baseline(
            str(rule), lambda texts: rule.predict(torch.tensor([len(t) for t in encode(texts)]))
        ),
        "bag of words": Baseline(
            f"logistic regression on {len(bag.vocabulary):,} token counts",
            lambda texts: bag.predict(encode(texts)),
        ),
    }


def score(fitted: dict[str, Baseline], splits: Splits) -> dict[str, dict[str, float]]:
    """Accuracy of each baseline on each split: name -> {"train": .., "val": .., "test": ..}.

    `splits`: the whole Splits, or any tuple or list of the three (train, val, test). Raises
    TypeError unless `fitted` is fit_baselines' dict and `splits` the three splits (not one).
    """
    if not isinstance(fitted, dict):
        raise TypeError(
            f"fitted must be the dict that fit_baselines returns, got a {type(fitted).__name__}; "
            "call score(fit_baselines(splits.train, tokenizer), splits)."
        )
    if (
        isinstance(splits, tuple | list)
        and len(splits) == 3
        and not any(isinstance(part, str) or _is_row(part) for part in splits)
    ):
        splits = Splits(*splits)
    if not isinstance(splits, Splits):
        raise TypeError(
            f"score takes the whole Splits (train, val, test) and scores each, got a "
            f"{type(splits).__name__}; pass splits, not one split such as splits.test."
        )
    return {
        name: {
            split: accuracy(baseline.predict([text for text, _ in part]), [y for _, y in part])
            for split, part in zip(("train", "val", "test"), splits, strict=True)
        }
        for name, baseline in fitted.items()
    }
