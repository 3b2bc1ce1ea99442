"""lora_helpers.explore: the pure functions behind the sliders of notebooks 01 and 02."""

import itertools
import math

import pytest
import torch

from lora_helpers.explore import (
    SCALING_RULES,
    BriefTraining,
    ParameterComparison,
    brief_training,
    first_steps,
    lora_layer_arguments,
    lora_parameter_counts,
    lora_scaling,
    low_rank_plus_noise,
    svd_relative_errors,
    truncated_svd,
    update_size_after_training,
)
from lora_helpers.lora import LoRALayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("d", "k", "rank", "full", "lora"),
    [(3, 4, 1, 12, 7), (100, 500, 5, 50_000, 3_000), (768, 768, 8, 589_824, 12_288)],
)
def test_lora_parameter_counts(d, k, rank, full, lora):
    counts = lora_parameter_counts(d, k, rank)
    assert counts == ParameterComparison(d, k, rank, full, lora)
    assert counts.ratio == lora / full


def test_break_even_rank():
    assert lora_parameter_counts(768, 768, 8).break_even_rank == 384
    counts = lora_parameter_counts(100, 500, 5)
    r = counts.break_even_rank
    assert r * (100 + 500) == pytest.approx(100 * 500)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 4, 1), "d must be a positive integer"),
        ((3, 4.0, 1), "k must be a positive integer"),
        ((3, 4, 0), "rank must be a positive integer"),
        ((3, 4, 4), r"rank 4 is larger than min\(d=3, k=4\) = 3"),
    ],
)
def test_lora_parameter_counts_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        lora_parameter_counts(*args)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    W = torch.randn(20, 30)
    errors = svd_relative_errors(W)
    for rank in (0, 1, 5, 20):
        approx = truncated_svd(W, rank)
        assert approx.shape == W.shape
        assert torch.linalg.matrix_rank(approx) == rank
        error = ((W - approx).norm() / W.norm()).item()
        assert error == pytest.approx(errors[rank].item(), abs=1e-5)
    # Eckart-Young: no other rank-5 matrix is closer, e.g. the first 5 columns of a QR basis.
    Q = torch.linalg.qr(W).Q[:, :5]
    other = Q @ Q.T @ torch.randn(20, 30)
    assert (W - other).norm() > (W - truncated_svd(W, 5)).norm()
    torch.testing.assert_close(truncated_svd(W, 20), W, atol=1e-5, rtol=1e-5)


def test_svd_relative_errors_shape_ends_and_order():
    torch.manual_seed(0)
    errors = svd_relative_errors(torch.randn(6, 9))
    assert errors.shape == (7,)
    assert errors[0].item() == pytest.approx(1.0)
    assert errors[-1].item() == 0.0
    assert torch.all(errors[1:] <= errors[:-1])


def test_svd_relative_errors_of_an_exact_low_rank_matrix():
    W = low_rank_plus_noise(40, 50, rank=3, noise=0.0, seed=1)
    errors = svd_relative_errors(W)
    assert errors[2] > 0.01
    assert errors[3] < 1e-5


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(0, 4), [[1.0, 2.0]]])
def test_matrix_functions_reject_non_matrices(bad):
    with pytest.raises(ValueError, match="Expected a non-empty 2-D tensor"):
        svd_relative_errors(bad)
    with pytest.raises(ValueError, match="Expected a non-empty 2-D tensor"):
        truncated_svd(bad, 1)


def test_svd_errors_reject_the_zero_matrix_and_bad_ranks():
    with pytest.raises(ValueError, match="W is all zeros"):
        svd_relative_errors(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"rank must be an integer from 0 to min\(3, 4\) = 3"):
        truncated_svd(torch.ones(3, 4), 4)
    with pytest.raises(ValueError, match="rank must be an integer"):
        truncated_svd(torch.ones(3, 4), 1.5)


def test_low_rank_plus_noise():
    W = low_rank_plus_noise(30, 40, rank=4, noise=0.05, seed=3)
    assert W.shape == (30, 40)
    assert torch.equal(W, low_rank_plus_noise(30, 40, rank=4, noise=0.05, seed=3))
    assert not torch.equal(W, low_rank_plus_noise(30, 40, rank=4, noise=0.05, seed=4))
    assert torch.linalg.matrix_rank(low_rank_plus_noise(30, 40, rank=4, noise=0.0)) == 4
    errors = svd_relative_errors(W)
    assert errors[4] < 0.1 < errors[3]  # four strong directions, then only noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 31}, "rank must be at most min"),
        ({"noise": -1.0}, "noise must be a finite number >= 0"),
        ({"noise": float("nan")}, "noise must be a finite number >= 0"),
    ],
)
def test_low_rank_plus_noise_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        low_rank_plus_noise(30, 40, **kwargs)


def test_lora_scaling():
    assert lora_scaling(16, 32) == 2.0
    assert lora_scaling(16, 32, "alpha/sqrt(rank)") == 8.0
    assert lora_scaling(16, 32, "alpha") == 32.0
    with pytest.raises(ValueError, match="Unknown scaling rule 'alpha/r'"):
        lora_scaling(16, 32, "alpha/r")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        lora_scaling(16, math.inf)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora_scaling(0, 8)


@pytest.mark.parametrize("rule", SCALING_RULES)
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_lora_layer_arguments_give_the_rules_factor(rule, rank):
    alpha, rslora = lora_layer_arguments(rank, 8, rule)
    assert LoRALayer(64, 64, rank, alpha, rslora=rslora).scaling == lora_scaling(rank, 8, rule)


def test_lora_layer_arguments_reject_an_unknown_rule():
    with pytest.raises(ValueError, match="Unknown scaling rule 'alpha\\*rank'"):
        lora_layer_arguments(4, 8, "alpha*rank")


def test_brief_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    train = brief_training.__wrapped__  # the function itself, without the cache
    first = train(4, 8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert train(4, 8) == first
    assert isinstance(first, BriefTraining)
    assert first.update_size > 0
    assert 0 < first.loss_drop < 1
    assert train(4, 8, seed=1) != first
    assert update_size_after_training(4, 8) == first.update_size
    assert brief_training(4, 8) is brief_training(4, 8)  # cached


def test_update_size_depends_on_rank_as_each_rule_says():
    ranks = (1, 4, 16, 64)
    sizes = {
        rule: [update_size_after_training(r, 8, rule) for r in ranks] for rule in SCALING_RULES
    }
    # At rank 1 the three rules are the same scaling, hence the same training.
    assert sizes["alpha/rank"][0] == sizes["alpha"][0] == sizes["alpha/sqrt(rank)"][0]
    a_over_r, alone = sizes["alpha/rank"], sizes["alpha"]
    assert all(later < earlier for earlier, later in itertools.pairwise(a_over_r))
    assert all(later > earlier for earlier, later in itertools.pairwise(alone))
    assert alone[-1] / alone[0] > 5  # alpha alone: rank 64 moves the weights far more
    stable = sizes["alpha/sqrt(rank)"]
    assert max(stable) / min(stable) < 2  # rank-stabilised: about the same at every rank


def test_update_size_grows_with_alpha():
    assert update_size_after_training(8, 16) > 1.5 * update_size_after_training(8, 8)


def test_update_size_rejects_bad_input():
    with pytest.raises(ValueError, match="Unknown scaling rule"):
        update_size_after_training(4, 8, "alpha*rank")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        update_size_after_training(4, 8, steps=0)
    with pytest.raises(ValueError, match="rank 65 is larger than min"):
        update_size_after_training(65, 8)


def test_brief_training_names_a_bad_width():
    with pytest.raises(ValueError, match="in_dim must be a positive integer"):
        brief_training(4, 8, in_dim=0)
    with pytest.raises(ValueError, match="out_dim must be a positive integer"):
        brief_training(4, 8, out_dim=-1)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        first_steps("paper", 4, 4, dim=0)


def test_truncated_svd_accepts_an_integer_matrix_as_svd_relative_errors_does():
    W = torch.tensor([[1, 2], [3, 4]])
    approx = truncated_svd(W, 1)
    exact = truncated_svd(W.float(), 1)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact)
    assert svd_relative_errors(W).shape == (3,)
