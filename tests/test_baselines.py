"""Baselines on hand-made data (the majority class, the length rule, the bag-of-words
regression), and what notebook 05 concludes from them, checked at tiny size."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_gpt import SOURCE

from lora_helpers import baselines, data, protocol, train
from lora_helpers.data import Splits
from lora_helpers.gpt2 import (
    FALLBACK_CONFIG,
    GPTModel,
    classify_logits,
    to_classifier,
)

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """Stands in for tiktoken: one token per character."""

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_majority_class_counts_training_labels_and_breaks_ties_towards_ham():
    assert baselines.majority_class([1, 0, 1]) == 1
    assert baselines.majority_class([0, 0, 1]) == 0
    assert baselines.majority_class([1, 0]) == 0
    with pytest.raises(ValueError, match="at least one labelled row"):
        baselines.majority_class([])
    with pytest.raises(ValueError, match=r"0 \(ham\) or 1 \(spam\), got \[0, 2\]"):
        baselines.majority_class([0, 2])


def test_length_rule_finds_the_threshold_and_the_direction():
    rule = baselines.fit_length_rule([3, 4, 10, 12], [0, 0, 1, 1])
    assert rule == baselines.LengthRule(10, spam_if_longer=True)  # thresholds are seen lengths
    assert str(rule) == "spam if >= 10 tokens"
    assert rule.predict(torch.tensor([9, 10, 30])).tolist() == [0, 1, 1]

    short_spam = baselines.fit_length_rule([3, 4, 10, 12], [1, 1, 0, 0])
    assert short_spam == baselines.LengthRule(10, spam_if_longer=False)
    assert str(short_spam) == "spam if < 10 tokens"
    assert short_spam.predict(torch.tensor([9, 10])).tolist() == [1, 0]


def test_length_rule_maximises_training_accuracy_when_no_threshold_is_perfect():
    lengths = [2, 3, 5, 6, 7, 9, 11]
    labels = [0, 0, 1, 0, 1, 1, 1]
    rule = baselines.fit_length_rule(lengths, labels)
    best = max(
        baselines.accuracy(baselines.LengthRule(t, d).predict(torch.tensor(lengths)), labels)
        for t in range(0, 13)
        for d in (True, False)
    )
    assert baselines.accuracy(rule.predict(torch.tensor(lengths)), labels) == best == 6 / 7
    assert rule == baselines.LengthRule(5, True)  # 7 is as accurate; ties go to the smaller


@pytest.mark.parametrize("labels", [[0, 0.5, 1], [0, 1, 2], [-1, 0]])
def test_labels_other_than_0_and_1_are_refused_not_truncated(labels):
    with pytest.raises(ValueError, match=r"Labels must be 0 \(ham\) or 1 \(spam\)"):
        baselines.accuracy(torch.zeros(len(labels), dtype=torch.long), labels)


def test_length_rule_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="3 lengths for 2 labels"):
        baselines.fit_length_rule([1, 2, 3], [0, 1])


def test_bag_of_words_learns_the_spam_token_and_ignores_unseen_ones():
    tokens = [[1, 2], [1, 3], [2, 3, 3], [4, 2], [4, 3], [4, 1, 4]]
    labels = [0, 0, 0, 1, 1, 1]
    bag = baselines.fit_bag_of_words(tokens, labels)
    assert bag.predict(tokens).tolist() == labels
    assert bag.predict([[4], [1], [4, 99]]).tolist() == [1, 0, 1]
    assert bag.weight[bag.vocabulary[4]] > 0 > bag.weight[bag.vocabulary[1]]
    assert bag.features([[99, 99]]).sum() == 0  # not in the training vocabulary: no feature
    assert bag.features([[3, 3, 1]])[0].tolist() == [1.0, 0.0, 2.0, 0.0]  # columns: tokens 1..4


def test_bag_of_words_is_deterministic_and_float64():
    tokens = [[1, 2], [1, 3], [4, 2], [4, 3]]
    first = baselines.fit_bag_of_words(tokens, [0, 0, 1, 1])
    second = baselines.fit_bag_of_words(tokens, [0, 0, 1, 1])
    assert first.weight.dtype == torch.float64
    assert torch.equal(first.weight, second.weight)
    assert first.bias == second.bias


def test_a_larger_l2_penalty_gives_smaller_weights():
    tokens = [[1, 2], [1, 3], [4, 2], [4, 3]]
    weak = baselines.fit_bag_of_words(tokens, [0, 0, 1, 1], l2=1e-3)
    strong = baselines.fit_bag_of_words(tokens, [0, 0, 1, 1], l2=1.0)
    assert strong.weight.norm() < weak.weight.norm()
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        baselines.fit_bag_of_words(tokens, [0, 0, 1, 1], l2=-1.0)
    with pytest.raises(ValueError, match="2 messages for 4 labels"):
        baselines.fit_bag_of_words(tokens[:2], [0, 0, 1, 1])


def test_accuracy_checks_lengths():
    assert baselines.accuracy(torch.tensor([1, 0, 1, 1]), [1, 0, 0, 1]) == 0.75
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        baselines.accuracy(torch.tensor([1, 0, 1]), [1, 0])


def test_baselines_fit_on_train_and_score_every_split():
    ham = [("ok see you", 0), ("on my way", 0), ("at home", 0), ("call me", 0)]
    spam = [("WIN a prize now!!", 1), ("WIN cash, call 0800", 1), ("you WIN, text STOP", 1)]
    splits = Splits(
        train=ham[:3] + spam[:2],
        val=[ham[3], spam[2]],
        test=[("lunch?", 0), ("WIN WIN WIN free entry", 1), ("see you at the station at six", 0)],
    )
    fitted = baselines.fit_baselines(splits.train, CharTokenizer())
    assert (
        {name: b.rule for name, b in fitted.items()}
        == {
            "majority class": "always ham",
            "length rule": "spam if >= 17 tokens",  # the longest training ham has 10, the shortest spam 17
            "bag of words": "logistic regression on 26 token counts",  # 26 distinct characters
        }
    )
    scores = baselines.score(fitted, splits)
    assert baselines.score(fitted, tuple(splits)) == scores  # a plain (train, val, test)
    assert baselines.score(fitted, list(splits)) == scores
    assert scores["majority class"] == {"train": 0.6, "val": 0.5, "test": 2 / 3}
    assert scores["length rule"] == {"train": 1.0, "val": 1.0, "test": 2 / 3}
    assert scores["bag of words"]["train"] == 1.0
    with pytest.raises(ValueError, match="at least one labelled row"):
        baselines.fit_baselines([], CharTokenizer())


def test_baselines_refuse_one_string_a_whole_splits_and_one_split_in_place_of_all():
    rows = [("ok see you", 0), ("WIN a prize now!!", 1), ("at home", 0)]
    splits = Splits(rows, rows, rows)
    fitted = baselines.fit_baselines(rows, CharTokenizer())
    for baseline in fitted.values():
        with pytest.raises(TypeError, match=r"got one str \('hello there'\); pass \[text\]"):
            baseline.predict("hello there")
        with pytest.raises(TypeError, match=r"holding a tuple; for rows"):
            baseline.predict(rows)
    with pytest.raises(TypeError, match=r"got the whole Splits; pass splits\.train"):
        baselines.fit_baselines(splits, CharTokenizer())
    with pytest.raises(TypeError, match=r"got \('a', 0, 1\) where a row should be"):
        baselines.fit_baselines([("a", 0, 1)], CharTokenizer())
    with pytest.raises(TypeError, match=r"got a list; pass splits, not one split"):
        baselines.score(fitted, splits.test)
    with pytest.raises(TypeError, match=r"got a tuple; pass splits, not one split"):
        baselines.score(fitted, tuple(splits.test))  # three rows are not three splits
    with pytest.raises(TypeError, match="the dict that fit_baselines returns"):
        baselines.score(fitted["length rule"], splits)


# ------------------------------------------------- what notebook 05 concludes, at tiny size


@pytest.fixture(scope="module")
def quick_splits(sms_rows) -> Splits:
    """The rows notebook 05 uses in quick mode."""
    rows = data.balance(sms_rows, seed=123)
    return data.subset(data.split(rows, (0.7, 0.1), seed=123), train.QUICK_RECIPE.sizes)


@pytest.fixture(scope="module")
def fitted(quick_splits, gpt2_tokenizer):
    return baselines.fit_baselines(quick_splits.train, gpt2_tokenizer)


def test_on_the_quick_rows_length_beats_the_majority_and_words_beat_length(quick_splits, fitted):
    scores = baselines.score(fitted, quick_splits)
    for split in ("val", "test"):
        assert scores["majority class"][split] < scores["length rule"][split]
        assert scores["length rule"][split] < scores["bag of words"][split]


@pytest.fixture(scope="module")
def stand_in(quick_splits, fitted, gpt2_tokenizer, tmp_path_factory, one_thread):
    """Notebook 05's quick mode at tiny size: a small random GPT-2 (real vocabulary, one
    32-dim block), each mode at one learning rate, three seeds; test errors and LoRA's run."""
    torch.manual_seed(123)
    config = {**FALLBACK_CONFIG, "context_length": 40, "emb_dim": 32, "n_heads": 2, "n_layers": 1}
    base = to_classifier(GPTModel(config), 2)
    loaders = data.make_loaders(quick_splits, gpt2_tokenizer, batch_size=8, max_length=40)
    recipe = dataclasses.replace(
        train.QUICK_RECIPE,
        lr_grid={"lora": (8e-4,), "full": (1.25e-3,), "last-block": (2.5e-4,)},
    )
    where = dict(device=CPU, checkpoint_dir=tmp_path_factory.mktemp("stand-in"), source=SOURCE)
    lora = train.run_mode(base, "lora", loaders, recipe, seed=0, progress=False, **where)
    tuned = {
        m: train.tune_mode(base, m, loaders, recipe, reuse=[lora], **where) for m in train.MODES
    }
    errors = {mode: t.spread("test_error") for mode, t in tuned.items()}
    scores = baselines.score(fitted, quick_splits)
    for name in ("length rule", "bag of words"):
        errors[name] = protocol.spread([1 - scores[name]["test"]])
    return errors, lora, loaders


def test_on_a_random_stand_in_the_last_block_is_within_the_length_rules_spread_and_loras(
    stand_in,
):
    """Seeds 0-2 (test messages right of 300): last block 256-263, LoRA 257-263, rule 261."""
    errors, _, _ = stand_in
    for a, b in (("last-block", "length rule"), ("lora", "last-block")):
        assert not protocol.clearly_lower(errors[a], errors[b]), errors
        assert not protocol.clearly_lower(errors[b], errors[a]), errors


def test_lora_on_a_random_stand_in_labels_almost_like_the_length_rule(
    stand_in, fitted, quick_splits
):
    _, lora, loaders = stand_in
    with torch.no_grad():
        says = classify_logits(lora.model.eval(), loaders.test.dataset.input_ids).argmax(-1)
    rule = fitted["length rule"].predict([text for text, _ in quick_splits.test])
    assert (says == rule).double().mean() >= 0.9


def test_full_fine_tuning_of_a_random_stand_in_beats_lora_and_the_last_block_and_words_win(
    stand_in,
):
    """Seeds 0-2: full 270-280 right of 300, LoRA and the last block at most 263, the bag of
    words 282. (With seeds 3 and 4 full's lowest is 262: the notebook's verdict is about its
    seeds 0-2.) At this size these claims also held with dropout 0.1 and clipping (full
    275-280, LoRA 259-263, last block 255-264), where the notebook found no winner: the
    notebook's own printout is checked below."""
    errors, _, _ = stand_in
    for mode in ("lora", "last-block"):
        assert protocol.clearly_lower(errors["full"], errors[mode]), errors
    assert protocol.clearly_lower(errors["bag of words"], errors["full"]), errors


def test_notebook_05_prints_the_verdicts_its_prose_reads():
    """LoRA above the length rule, and full fine-tuning above LoRA and the last block, in
    every seed hold at the notebook's size only (at tiny size LoRA's seeds straddle the rule),
    so this reads the notebook's own printout: nbval checks on every run that a fresh run
    prints exactly that, with this CPU's kernels and with others, and this test that the
    printout still says what the prose (markdown cell 31) says."""
    cells = json.loads((ROOT / "notebooks" / "05_finetune_gpt2.ipynb").read_text())["cells"]
    printed = "".join(
        "".join(out.get("text", ""))
        for cell in cells
        if cell["cell_type"] == "code"
        for out in cell.get("outputs", [])
    )
    prose = " ".join(
        word
        for cell in cells
        if cell["cell_type"] == "markdown" and "What this run shows" in "".join(cell["source"])
        for word in "".join(cell["source"]).split()
    )
    assert prose, "the markdown cell 'What this run shows, and what it cannot' is gone"
    for verdict, reading in (
        ("full has a higher test accuracy than lora in every seed", "it beats LoRA and the last"),
        ("full has a higher test accuracy than last-block in every seed", "block in each of the"),
        ("lora and last-block are within the spread of each other", "the spread of each other"),
        (
            "lora has a higher test accuracy than length rule in every seed",
            "above it in every seed",
        ),
        ("last-block and length rule are within the spread of each other", "the last block within"),
        ("bag of words has a higher test accuracy than full in every seed", "beats full fine-"),
    ):
        assert verdict in printed, verdict
        assert reading in prose, reading
    # "only just": at the table's precision the ranges' ends read the same
    table = {
        mode: tuple(map(int, ends))
        for mode, *ends in re.findall(
            r"^ *(\S+) +\S+ +3 +\S+ +\S+ +\d+ \((\d+)-(\d+)\)$", printed, re.M
        )
    }
    rule = re.search(r"^ +length rule +- +- +\S+ +([\d.]+)$", printed, re.M)
    assert set(table) == {"lora", "full", "last-block"}, printed
    assert rule, printed
    lora_low, full_low = table["lora"][0], table["full"][0]
    assert lora_low == round(float(rule.group(1))), "LoRA's lowest seed against the rule"
    assert full_low == max(table["lora"][1], table["last-block"][1]), "full's lowest seed"
    assert f"its lowest seed and the rule both read {lora_low}" in prose
    assert f"its lowest seed and their highest both read {full_low}" in prose
