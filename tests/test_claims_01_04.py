"""The source claims that notebooks 01-04 check, and the conclusions their prose draws.

Each test recomputes what one "claim checked" verdict or one sentence rests on, with the
notebook's settings, and fails if it would no longer be true. Counts run on the meta device;
the training runs are float64 and seeded, so the outcome does not depend on the CPU.
"""

import copy
import math

import pytest
import torch
from torch import nn

from lora_helpers import protocol
from lora_helpers.attention import MultiHeadAttention
from lora_helpers.claims import (
    LLAMA_ATTENTION,
    LLAMA_MLP,
    TutorialAttention,
    TutorialLoRALinear,
    apply_lora_like_the_tutorial,
    llama_lora_count,
)
from lora_helpers.explore import (
    A_INITS,
    a_init_std,
    first_steps,
    init_lora_A_,
    lora_parameter_counts,
)
from lora_helpers.gpt2 import GPTModel, gpt2_config, to_classifier
from lora_helpers.lora import LinearWithLoRA, count_parameters, freeze, replace_linear_with_lora

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = (0, 1, 2, 3, 4)  # notebook 02's seeds


# --- 01: the low-rank worked examples (claim 10) -----------------------------------------------


@pytest.mark.parametrize(
    ("d", "k", "rank", "full", "lora"), [(3, 4, 1, 12, 7), (100, 500, 5, 50_000, 3_000)]
)
def test_the_worked_examples_are_reproduced(d, k, rank, full, lora):
    counts = lora_parameter_counts(d, k, rank)
    assert (counts.full, counts.lora) == (full, lora)


# --- 02: exactly one factor starts at zero (claim 4) --------------------------------------------


def twenty_steps(zero_a: bool) -> torch.Tensor:
    """Notebook 02's cell: 20 Adam steps towards a random target; returns the learned ΔW."""
    torch.manual_seed(0)
    base, x, target = nn.Linear(64, 32), torch.randn(8, 64), torch.randn(8, 32)
    layer = LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8)
    if zero_a:
        with torch.no_grad():
            layer.lora.A.zero_()
    optimizer = torch.optim.Adam(layer.lora.parameters(), lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        (layer(x) - target).square().mean().backward()
        optimizer.step()
    return layer.lora.delta_weight()


def test_both_factors_at_zero_never_learn_and_one_at_zero_does():
    assert torch.count_nonzero(twenty_steps(zero_a=True)) == 0  # "stay zero, however long"
    assert torch.count_nonzero(twenty_steps(zero_a=False)) == 32 * 64


# --- 02: three ways to draw A -------------------------------------------------------------------


def test_the_books_draw_of_a_is_693_times_pefts_at_gpt2_width_and_rank_16():
    std = {init: a_init_std(init, 768, 16) for init in A_INITS}
    assert round(std["book"] / std["PEFT, ours"], 2) == 6.93 == round(math.sqrt(768 / 16), 2)
    assert std["PEFT, ours"] < std["paper"] < std["book"]  # "the paper's Gaussian in between"


@pytest.mark.parametrize("init", list(A_INITS))
def test_init_lora_a_draws_with_the_stated_spread(init):
    A = torch.empty(768, 16, dtype=torch.float64)
    init_lora_A_(A, init, generator=torch.Generator().manual_seed(0))
    assert A.std().item() == pytest.approx(a_init_std(init, 768, 16), rel=0.03)
    if init != "paper":  # uniform: bounded by sqrt(3) standard deviations
        assert A.abs().max() <= math.sqrt(3) * a_init_std(init, 768, 16)
    with pytest.raises(ValueError, match="Unknown initialisation"):
        init_lora_A_(A, "xavier")


def removed(init: str, steps: int, lr: float, seeds=SEEDS) -> protocol.Spread:
    runs = [first_steps(init, steps=steps, lr=lr, seed=s) for s in seeds]
    return protocol.spread([100 * (1 - run.losses[-1] / run.losses[0]) for run in runs])


def test_the_first_update_is_in_proportion_to_a():
    for seed in SEEDS:
        size = {init: first_steps(init, seed=seed).update_sizes for init in A_INITS}
        assert round(size["book"][0] / size["PEFT, ours"][0], 2) == 6.93  # "6.93 times"
        for step in (0, 9):  # steps 1 and 10: PEFT < paper < book in every seed
            assert size["PEFT, ours"][step] < size["paper"][step] < size["book"][step]


def test_a_larger_a_removes_more_in_10_small_steps_and_the_same_in_30_larger_ones():
    book, peft = removed("book", 10, 1e-3), removed("PEFT, ours", 10, 1e-3)
    assert protocol.clearly_lower(peft, book)  # "more of the loss than PEFT's in every seed"
    assert (round(book.mean, 1), round(peft.mean, 1)) == (8.1, 2.8)
    late = [removed(init, 30, 1e-2) for init in A_INITS]
    assert {round(s.mean, 1) for s in late} == {25.5}  # "25.5 % each, on average"
    for a in late:  # "within the spread of each other"
        assert all(a.low <= b.high and b.low <= a.high for b in late)


def test_first_steps_refuses_a_rank_above_the_width():
    with pytest.raises(ValueError, match="rank 9 is larger than min"):
        first_steps("paper", rank=9, dim=8)


# --- 03: sizes and wording -----------------------------------------------------------------------


def test_notebook_03s_attention_has_gpt2_smalls_sizes():
    attention = MultiHeadAttention(768, 768, 1024, 0.0, 12, qkv_bias=True)
    with torch.device("meta"):
        gpt2_attention = GPTModel(gpt2_config("gpt2-small")).trf_blocks[0].att
    assert count_parameters(attention).total == count_parameters(gpt2_attention).total
    assert 12 * count_parameters(attention).total == 28_348_416  # notebook 04's attention row


def lora_trainable(targets: list[str], rank: int = 16) -> int:
    with torch.device("meta"):
        model = to_classifier(GPTModel(gpt2_config("gpt2-small")), 2)
    replace_linear_with_lora(freeze(model), rank, rank, target_modules=targets)
    return count_parameters(model).trainable


def test_lora_on_the_feed_forward_trains_more_than_on_all_of_attention():
    """03's intro: "the feed-forward layers hold more weights" (04's table at rank 16)."""
    feed_forward = lora_trainable(["ff.layers.0", "ff.layers.2"])
    attention = lora_trainable(["W_query", "W_key", "W_value", "out_proj"])
    assert (feed_forward, attention) == (1_474_560, 1_179_648)


# --- 04: the book's counts (claim 1) -------------------------------------------------------------


def test_the_books_call_leaves_467_times_fewer_trainable_parameters():
    with torch.device("meta"):
        model = to_classifier(GPTModel(gpt2_config("gpt2-small")), 2)
    before = count_parameters(model).trainable
    with pytest.warns(UserWarning, match="out_head"):
        replace_linear_with_lora(freeze(model), rank=16, alpha=16)
    after = count_parameters(model).trainable
    assert (before, after) == (124_441_346, 2_666_528)
    assert round(before / after, 1) == 46.7  # "about 50x fewer": reproduced


# --- 04: a 7B model at rank 8 (claim 7) -----------------------------------------------------------


@pytest.fixture(scope="module")
def llama_counts():
    pytest.importorskip("transformers")
    choices = {
        "qv": ["q_proj", "v_proj"],
        "qkv": ["q_proj", "k_proj", "v_proj"],
        "qkvo": LLAMA_ATTENTION,
        "mlp": LLAMA_MLP,
        "all": LLAMA_ATTENTION + LLAMA_MLP,
    }
    return {name: llama_lora_count(targets, rank=8).trainable for name, targets in choices.items()}


def test_llama_2_7b_has_its_published_size():
    pytest.importorskip("transformers")
    assert llama_lora_count(None).total == 6_738_415_616


def test_7b_at_rank_8_is_4_2_million_on_q_v_and_20_million_on_every_linear(llama_counts):
    assert llama_counts["qv"] == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    per_block = 4 * 8 * (4096 + 4096) + 3 * 8 * (4096 + 11008)
    assert llama_counts["all"] == 32 * per_block == 19_988_480


def test_no_common_choice_gives_about_7_million(llama_counts):
    """The verdict: 7 M lies between {q, k, v} (6,291,456) and {q, k, v, o} (8,388,608)."""
    assert llama_counts["qkv"] == 6_291_456
    assert llama_counts["qkvo"] == 8_388_608
    assert llama_counts["qkv"] < 7_000_000 < llama_counts["qkvo"]
    assert all(abs(n - 7e6) / 7e6 > 0.1 for n in llama_counts.values())


# --- 04: the tutorial's count (claim 3) ------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def test_the_tutorials_count_is_what_remains_and_mostly_fresh_attention(transformers):
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        before = sum(p.numel() for p in hf.parameters() if p.requires_grad)
        assert apply_lora_like_the_tutorial(hf.requires_grad_(False), rank=8, alpha=16) is None
    trainable = {n: p.numel() for n, p in hf.named_parameters() if p.requires_grad}
    after = sum(trainable.values())
    assert (before, after) == (124_439_808, 29_346_440)
    assert (round(100 * after / before, 2), round(100 - 100 * after / before, 2)) == (23.58, 76.42)
    fresh = sum(n for name, n in trainable.items() if ".linear." in name)
    assert fresh == 28_348_416  # four new 768 x 768 linears (with biases) in each of 12 blocks


def first_token_moves(attention: nn.Module) -> bool:
    """Does the first token's output change when only the last token changes?"""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 64)
    changed = torch.cat([x[:, :-1], torch.randn(1, 1, 64)], dim=1)
    with torch.no_grad():
        return (attention(changed)[0, 0] - attention(x)[0, 0]).abs().max().item() > 1e-6


def test_the_tutorials_attention_has_no_causal_mask_and_ours_has():
    torch.manual_seed(0)
    assert first_token_moves(TutorialAttention(64, 4, rank=8, alpha=16))
    assert not first_token_moves(MultiHeadAttention(64, 64, 8, 0.0, 4))


def test_gpt2s_block_cannot_call_the_tutorials_attention(transformers):
    torch.manual_seed(0)
    tiny = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2))
    apply_lora_like_the_tutorial(tiny.requires_grad_(False), rank=8, alpha=16)
    assert isinstance(tiny.transformer.h[0].attn, TutorialAttention)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        tiny(torch.randint(0, 50257, (1, 8)))


def test_the_tutorials_wrapper_leaves_the_linear_trainable_and_scales_by_alpha():
    torch.manual_seed(0)
    wrapped = TutorialLoRALinear(nn.Linear(8, 4), rank=2, alpha=16)
    assert wrapped.linear.weight.requires_grad  # "unlike ours, leaves the wrapped layer trainable"
    with torch.no_grad():
        wrapped.B.fill_(1.0)
    x = torch.randn(3, 8)
    assert torch.allclose(wrapped(x) - wrapped.linear(x), 16 * x @ wrapped.A @ wrapped.B)


def test_llama_count_takes_a_single_str_as_one_target(llama_counts):
    assert llama_lora_count("q_proj").trainable == llama_counts["qv"] // 2 == 2_097_152
