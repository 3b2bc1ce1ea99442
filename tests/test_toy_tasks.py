"""lora_helpers.toy_tasks: the low-rank regression of notebook 02 and the copy task of notebook 03."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_helpers import protocol
from lora_helpers.attention import MultiHeadAttention, add_lora_to_attention
from lora_helpers.lora import LinearWithLoRA, mark_only_lora_as_trainable
from lora_helpers.toy_tasks import (
    DTYPE,
    CopyModel,
    TrainingRun,
    adapt_copy_model,
    attention_weights,
    copy_accuracy,
    copy_attention_pattern,
    copy_batch,
    copy_loss,
    fit_lora,
    fit_regression,
    low_rank_change_task,
    train_copy_task,
    train_with_early_stopping,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_low_rank_change_task():
    state = torch.random.get_rng_state()
    task = low_rank_change_task(16, 12, change_rank=3, n_samples=50, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for x, y in ((task.x, task.y), (task.x_val, task.y_val), (task.x_test, task.y_test)):
        assert x.shape == (50, 16)
        assert y.shape == (50, 12)
        assert x.dtype == y.dtype == task.base.weight.dtype == DTYPE == torch.float64
        with torch.no_grad():
            torch.testing.assert_close(y, task.base(x) + x @ task.delta.T)
    assert not torch.equal(task.x, task.x_val)
    assert not torch.equal(task.x_val, task.x_test)
    assert task.delta.shape == (12, 16)
    assert torch.linalg.matrix_rank(task.delta) == 3
    again = low_rank_change_task(16, 12, change_rank=3, n_samples=50, seed=0)
    assert torch.equal(again.y_test, task.y_test)
    assert torch.equal(again.base.weight, task.base.weight)
    single = low_rank_change_task(16, 12, change_rank=3, n_samples=50, dtype=torch.float32)
    assert single.x.dtype == single.base.weight.dtype == torch.float32


@pytest.mark.parametrize("change_rank", [0, 13])
def test_low_rank_change_task_rejects_bad_rank(change_rank):
    with pytest.raises(ValueError, match=r"change_rank must be from 1 to min\(in_dim, out_dim\)"):
        low_rank_change_task(16, 12, change_rank=change_rank)


def test_lora_of_the_right_rank_learns_the_change_and_a_lower_rank_cannot():
    task = low_rank_change_task(32, 32, change_rank=2, n_samples=256)
    results = {}
    for rank in (1, 2):
        torch.manual_seed(0)
        layer = LinearWithLoRA(copy.deepcopy(task.base), rank=rank, alpha=rank)
        run = fit_regression(layer, task.x, task.y, val=(task.x_val, task.y_val), steps=150)
        assert len(run.losses) == 150
        assert run.val_steps == list(range(151))  # before training, then after every step
        assert torch.equal(layer.linear.weight, task.base.weight)  # the base stayed frozen
        results[rank] = run.val_loss / run.val_losses[0], layer.lora.delta_weight()
    assert results[2][0] < 1e-3
    torch.testing.assert_close(results[2][1], task.delta, atol=1e-2, rtol=0)
    assert results[1][0] > 0.1


def test_early_stopping_keeps_the_parameters_of_the_best_validation_step():
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    # Training pulls w towards 3; validation wants it at 1, which training passes on the way.
    run = train_with_early_stopping(
        [w],
        lambda: (w - 3).square().sum(),
        lambda: (w - 1).square().sum().item(),
        steps=40,
        lr=0.1,
    )
    assert run.losses[0] == 9.0
    assert 0 < run.best_step < 40
    assert run.val_loss == min(run.val_losses) == run.val_losses[run.best_step]
    assert (w.item() - 1) ** 2 == pytest.approx(run.val_loss)  # w is back at the best step
    assert abs(w.item() - 1) < 0.1


def test_early_stopping_evaluates_every_few_steps_and_after_the_last():
    w = nn.Parameter(torch.ones(1))
    run = train_with_early_stopping(
        [w],
        lambda: w.square().sum(),
        lambda: w.square().sum().item(),
        steps=25,
        lr=0.01,
        eval_every=10,
    )
    assert run.val_steps == [0, 10, 20, 25]
    assert run.best_step == 25
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        train_with_early_stopping([w], w.sum, lambda: 0.0, steps=0, lr=0.1)


def test_a_run_that_overshoots_has_a_peak_ratio_above_one():
    assert TrainingRun(losses=[2.0, 5.0, 1.0]).peak_ratio == 2.5
    assert TrainingRun(losses=[2.0, 1.0]).peak_ratio == 1.0


@pytest.mark.parametrize("rule", ["alpha/rank", "alpha/sqrt(rank)", "alpha"])
def test_fit_lora_scales_by_the_rule(rule):
    task = low_rank_change_task(16, 16, change_rank=2, n_samples=32)
    state = torch.random.get_rng_state()
    fit = fit_lora(task, 4, 2, rule=rule, steps=5, lr=0.01, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    expected = {"alpha/rank": 2 / 4, "alpha/sqrt(rank)": 2 / 2, "alpha": 2}[rule]
    assert fit.layer.lora.scaling == expected
    assert fit.layer.lora.A.dtype == torch.float64
    assert fit.val_loss == fit.run.val_loss
    with torch.no_grad():
        assert fit.test_loss == pytest.approx(
            F.mse_loss(fit.layer(task.x_test), task.y_test).item()
        )
    assert torch.equal(fit.layer.linear.weight, task.base.weight)
    again = fit_lora(task, 4, 2, rule=rule, steps=5, lr=0.01, seed=3)
    assert again.test_loss == fit.test_loss


def test_training_needs_trainable_parameters():
    task = low_rank_change_task(8, 8, change_rank=1, n_samples=10)
    frozen = task.base.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters; add LoRA layers"):
        fit_regression(frozen, task.x, task.y, val=(task.x_val, task.y_val), steps=1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_copy_task(CopyModel().requires_grad_(False), 1, steps=1)


def test_copy_batch_targets_are_the_tokens_offset_places_back():
    g = torch.Generator().manual_seed(0)
    idx, targets = copy_batch(4, offset=2, vocab_size=10, context_length=7, generator=g)
    assert idx.shape == targets.shape == (4, 7)
    assert torch.all(targets[:, :2] == -100)
    assert torch.equal(targets[:, 2:], idx[:, :-2])
    assert idx.max() < 10


@pytest.mark.parametrize("offset", [0, 7])
def test_copy_batch_rejects_bad_offset(offset):
    g = torch.Generator()
    with pytest.raises(ValueError, match="offset must be from 1 to context_length - 1 = 6"):
        copy_batch(4, offset=offset, vocab_size=10, context_length=7, generator=g)


def test_copy_model_shapes():
    model = CopyModel(vocab_size=11, d_model=16, context_length=9, num_heads=4)
    assert model(torch.zeros(3, 9, dtype=torch.long)).shape == (3, 9, 11)
    assert model(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, 11)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    single = CopyModel(dtype=torch.float32)
    assert {p.dtype for p in single.parameters()} == {torch.float32}


@pytest.fixture(scope="module")
def pretrained() -> CopyModel:
    """A CopyModel trained to copy the previous token, as in notebook 03."""
    torch.manual_seed(0)
    model = CopyModel()
    run = train_copy_task(model, offset=1, steps=300, lr=3e-3)
    assert run.val_steps[:3] == [0, 10, 20]
    assert run.val_steps[-1] == 300
    return model


def test_pretraining_learns_the_copy_task(pretrained):
    assert copy_accuracy(pretrained, offset=1) > 0.99
    assert copy_accuracy(pretrained, offset=2) < 0.15  # about chance, 1 / 16
    assert copy_loss(pretrained, offset=1) < 0.01
    assert copy_loss(pretrained, offset=1, seed=7) != copy_loss(pretrained, offset=1)


def test_lora_on_attention_moves_where_it_looks(pretrained):
    model = copy.deepcopy(pretrained)
    torch.manual_seed(0)
    mark_only_lora_as_trainable(add_lora_to_attention(model, "qv", rank=4, alpha=8))
    train_copy_task(model, offset=2, steps=300)
    assert copy_accuracy(model, offset=2) > 0.95
    pattern = copy_attention_pattern(model).mean(0)  # (tokens, tokens), averaged over heads
    rows = torch.arange(2, 12)
    assert pattern[rows, rows - 2].mean() > 0.8  # attends two places back now
    before = copy_attention_pattern(pretrained).mean(0)
    assert before[rows, rows - 1].mean() > 0.8  # it attended one place back


def test_lora_on_values_and_output_alone_cannot_move_attention(pretrained):
    model = copy.deepcopy(pretrained)
    torch.manual_seed(0)
    mark_only_lora_as_trainable(add_lora_to_attention(model, "vo", rank=4, alpha=8))
    train_copy_task(model, offset=2, steps=100)
    assert torch.equal(copy_attention_pattern(model), copy_attention_pattern(pretrained))
    assert copy_accuracy(model, offset=2) < 0.15


def test_adapt_copy_model_scores_a_frozen_copy_on_the_test_set(pretrained):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    state = torch.random.get_rng_state()
    result = adapt_copy_model(pretrained, "qv", 4, steps=20, lr=0.03, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())
    assert result.val_loss == result.run.val_loss
    assert len(result.run.losses) == 20
    assert result.test_loss == copy_loss(result.model, 2)
    assert result.test_accuracy == copy_accuracy(result.model, 2)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {f"att.{w}.lora.{m}" for w in ("W_query", "W_value") for m in "AB"}


def test_attention_weights_are_the_ones_the_layer_uses():
    torch.manual_seed(0)
    att = MultiHeadAttention(12, 12, context_length=6, dropout=0.0, num_heads=3)
    x = torch.randn(2, 6, 12)
    w = attention_weights(att, x)
    assert w.shape == (2, 3, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6))
    assert torch.count_nonzero(w.triu(1)) == 0
    v = att.W_value(x).view(2, 6, 3, 4).transpose(1, 2)
    context = (w @ v).transpose(1, 2).reshape(2, 6, 12)
    torch.testing.assert_close(att.out_proj(context), att(x))


def test_copy_attention_pattern_shape():
    pattern = copy_attention_pattern(CopyModel(num_heads=2, context_length=12), n_sequences=4)
    assert pattern.shape == (2, 12, 12)
    assert isinstance(CopyModel().head, nn.Linear)


@pytest.mark.parametrize("batch_size", [0, -4])
def test_copy_training_refuses_a_batch_size_below_one(batch_size):
    model = CopyModel(vocab_size=5, d_model=8, context_length=4, num_heads=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        train_copy_task(model, 1, steps=1, batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        adapt_copy_model(model, "qv", 2, steps=1, batch_size=batch_size)


def test_protocol_tune_sees_the_best_step_of_a_fit_and_skips_a_step_0_run():
    task = low_rank_change_task(in_dim=8, out_dim=8, change_rank=1, seed=0)
    fit = fit_lora(task, 1, alpha=1, steps=5, lr=1e-2, seed=0)
    assert fit.best_step == fit.run.best_step
    with pytest.raises(ValueError, match="never improved on the untrained model"):
        protocol.tune(
            "x", lambda lr, seed: fit_lora(task, 1, alpha=1, steps=5, lr=lr, seed=seed), lrs=(1e6,)
        )
