"""lora_helpers.dora: DoRA checked against hand-computed cases, merging and bad input."""

import copy
import math

import pytest
import torch
from torch import nn

from lora_helpers.dora import (
    LinearWithDoRA,
    dora_layers,
    mark_only_dora_as_trainable,
    merge_dora,
    replace_linear_with_dora,
)
from lora_helpers.lora import RankWarning, count_parameters


def hand_layer() -> nn.Linear:
    """W = [[3, 4], [0, 2]] (row norms 5 and 2), no bias."""
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    return linear


def trained_like(layer: LinearWithDoRA, seed: int = 0) -> LinearWithDoRA:
    """Move B and m away from their initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g))
        layer.m.mul_(1 + torch.rand(layer.m.shape, generator=g))
    return layer


def test_magnitude_starts_at_the_row_norms_of_the_weight():
    dora = LinearWithDoRA(hand_layer(), rank=1, alpha=1)
    assert torch.equal(dora.m.detach(), torch.tensor([5.0, 2.0]))


def test_equals_the_base_layer_exactly_at_initialisation():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    dora = LinearWithDoRA(linear, rank=4, alpha=8)
    x = torch.randn(3, 5, 16)
    assert torch.equal(dora(x), linear(x))


def test_forward_matches_a_hand_computed_case():
    dora = LinearWithDoRA(hand_layer(), rank=1, alpha=1)  # scaling 1
    with torch.no_grad():
        dora.lora.A.copy_(torch.tensor([[1.0], [0.0]]))  # (in, rank)
        dora.lora.B.copy_(torch.tensor([[0.0, 1.0]]))  # (rank, out)
        dora.m.copy_(torch.tensor([10.0, 1.0]))
    # dW = (A B)^T = [[0, 0], [1, 0]]; W + dW = [[3, 4], [1, 2]], row norms 5 and sqrt(5)
    s5 = math.sqrt(5)
    expected_weight = torch.tensor([[6.0, 8.0], [1 / s5, 2 / s5]])
    assert torch.allclose(dora.adapted_weight(), expected_weight)
    y = dora(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(y, torch.tensor([[14.0, 3 / s5]]))


def test_direction_rows_have_the_magnitudes_as_norms():
    dora = trained_like(LinearWithDoRA(nn.Linear(12, 6), rank=2, alpha=4))
    assert torch.allclose(dora.adapted_weight().norm(dim=1), dora.m.detach(), rtol=1e-5)


def test_only_a_b_and_m_train_and_all_get_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    replace_linear_with_dora(model, rank=2, alpha=4)
    mark_only_dora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 2) for p in ("lora.A", "lora.B", "m")}
    for _, layer in dora_layers(model):
        trained_like(layer)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_parameter_count_is_lora_plus_one_magnitude_per_output():
    dora = LinearWithDoRA(nn.Linear(20, 12), rank=3, alpha=6)
    assert count_parameters(dora).trainable == 3 * (20 + 12) + 12


def test_rslora_scaling():
    dora = LinearWithDoRA(nn.Linear(16, 16), rank=4, alpha=8, rslora=True)
    assert dora.lora.scaling == pytest.approx(8 / 2)


def dora_with_an_update() -> tuple[LinearWithDoRA, torch.Tensor]:
    """A 16 -> 8 LinearWithDoRA with a non-zero update and m, and a copy of its base weight."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    original = linear.weight.detach().clone()
    return trained_like(LinearWithDoRA(linear, rank=4, alpha=8)), original


def test_merge_gives_the_same_outputs_and_unmerge_restores_the_weight():
    dora, original = dora_with_an_update()
    linear = dora.linear
    x = torch.randn(10, 16)
    before = dora(x)
    dora.merge()
    assert dora.merged
    assert torch.allclose(dora(x), before, atol=1e-5)
    assert torch.allclose(linear(x), before, atol=1e-5)  # the plain layer now carries W'
    merged_weight = linear.weight.detach().clone()
    dora.merge()  # a second merge changes nothing
    assert torch.equal(linear.weight, merged_weight)
    dora.unmerge()
    assert not dora.merged
    assert torch.allclose(linear.weight, original, atol=1e-5)
    assert torch.allclose(dora(x), before, atol=1e-5)


def test_merge_dora_merges_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    replace_linear_with_dora(model, rank=2, alpha=2)
    for _, layer in dora_layers(model):
        trained_like(layer)
    x = torch.randn(5, 8)
    before = model(x)
    merge_dora(model)
    assert all(layer.merged for _, layer in dora_layers(model))
    assert torch.allclose(model(x), before, atol=1e-5)


def test_replace_only_the_named_targets():
    model = nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    replace_linear_with_dora(model, rank=1, alpha=1, target_modules=["q", "v"])
    assert [name for name, _ in dora_layers(model)] == ["q", "v"]
    assert isinstance(model["head"], nn.Linear)
    replace_linear_with_dora(model, rank=1, alpha=1)  # wraps what is left, not the wrapped ones
    assert [name for name, _ in dora_layers(model)] == ["q", "v", "head"]


def test_unknown_target_names_the_layers():
    model = nn.ModuleDict({"q": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"Unknown target module\(s\) \['k'\].*\['q'\]"):
        replace_linear_with_dora(model, rank=1, alpha=1, target_modules="k")


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        replace_linear_with_dora(nn.Sequential(nn.ReLU()), rank=1, alpha=1)


@pytest.mark.parametrize("rank", [0, -1, 1.5])
def test_invalid_rank_is_refused(rank):
    with pytest.raises(ValueError, match="rank"):
        LinearWithDoRA(nn.Linear(8, 8), rank=rank, alpha=1)


def test_a_rank_above_min_in_out_only_warns_as_for_lora():
    with pytest.warns(RankWarning, match=r"rank 9 is larger than min\(in_dim=8, out_dim=8\)"):
        LinearWithDoRA(nn.Linear(8, 8), rank=9, alpha=1)


def test_non_linear_is_refused():
    with pytest.raises(TypeError, match=r"wraps an nn\.Linear, got Conv1d"):
        LinearWithDoRA(nn.Conv1d(4, 4, 1), rank=1, alpha=1)


def test_zero_row_is_refused():
    linear = hand_layer()
    with torch.no_grad():
        linear.weight[1] = 0
    with pytest.raises(ValueError, match="Row 1 of the weight is all zeros"):
        LinearWithDoRA(linear, rank=1, alpha=1)


# --------------------------------------------------------------- gradients, against PEFT


def _dora_and_peft(exact: bool, rslora: bool = False):
    """Our DoRA layer and PEFT's use_dora=True on the same weights, B and m moved off init."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8))
    ours = trained_like(
        LinearWithDoRA(copy.deepcopy(base[0]), 4, 8, rslora=rslora, exact_norm_gradient=exact)
    )
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_dora=True, use_rslora=rslora
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora.A.T)
        layer.lora_B["default"].weight.copy_(ours.lora.B.T)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.m)
    x = torch.randn(5, 16)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    grads = {
        "A": (ours.lora.A.grad, layer.lora_A["default"].weight.grad.T),
        "B": (ours.lora.B.grad, layer.lora_B["default"].weight.grad.T),
        "m": (ours.m.grad, layer.lora_magnitude_vector["default"].weight.grad),
    }
    return ours, theirs, x, grads


@pytest.mark.parametrize("rslora", [False, True])
def test_gradients_match_peft_and_the_paper_by_default(rslora):
    """The DoRA paper (section 4.3) and PEFT treat ||W + dW|| as a constant in backprop."""
    ours, theirs, x, grads = _dora_and_peft(exact=False, rslora=rslora)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    for name, (mine, peft) in grads.items():
        torch.testing.assert_close(mine, peft, rtol=1e-6, atol=1e-6, msg=name)


def test_the_exact_gradient_differs_in_a_and_b_only():
    exact = _dora_and_peft(exact=True)[3]
    torch.testing.assert_close(*exact["m"], rtol=1e-6, atol=1e-6)
    for name in ("A", "B"):
        mine, peft = exact[name]
        assert (mine - peft).norm() > 0.05 * peft.norm(), name  # through the norm: another gradient


def test_the_exact_gradient_is_the_true_derivative():
    """Finite differences of the loss along B agree with exact_norm_gradient=True only."""
    torch.manual_seed(0)
    for exact in (True, False):
        layer = trained_like(
            LinearWithDoRA(nn.Linear(6, 4).double(), 2, 4, exact_norm_gradient=exact)
        )
        x = torch.randn(3, 6, dtype=torch.float64)
        layer(x).square().sum().backward()
        direction = torch.randn_like(layer.lora.B)
        with torch.no_grad():
            eps = 1e-6
            layer.lora.B += eps * direction
            up = layer(x).square().sum()
            layer.lora.B -= 2 * eps * direction
            down = layer(x).square().sum()
            layer.lora.B += eps * direction
        numeric = (up - down) / (2 * eps)
        analytic = (layer.lora.B.grad * direction).sum()
        assert torch.isclose(numeric, analytic, rtol=1e-5).item() == exact


def test_unmerge_restores_the_weight_even_if_m_a_and_b_changed_while_merged():
    dora, original = dora_with_an_update()
    linear = dora.linear
    dora.merge()
    with torch.no_grad():
        dora.m.mul_(3)
        dora.lora.B.add_(1)
    dora.unmerge()
    assert torch.allclose(linear.weight, original, atol=1e-5)


def test_merging_a_dora_layer_whose_weight_is_tied_is_refused():
    model = nn.ModuleDict({"tok_emb": nn.Embedding(10, 4), "out_head": nn.Linear(4, 10)})
    model.out_head.weight = model.tok_emb.weight
    replace_linear_with_dora(model, rank=2, alpha=4)
    weight = model.tok_emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"shares its memory with 'tok_emb\.weight'"):
        model.out_head.merge()
    assert not model.out_head.merged
    assert torch.equal(model.tok_emb.weight, weight)


def test_a_merged_dora_state_loaded_into_a_merged_layer_unmerges_to_its_own_base():
    saved, original = dora_with_an_update()
    saved.merge()
    state = copy.deepcopy(saved.state_dict())
    other = trained_like(LinearWithDoRA(nn.Linear(16, 8), rank=4, alpha=8), seed=1)
    other.merge()
    other.load_state_dict(state)
    with torch.no_grad():
        other.m.mul_(2)  # changed after the load: unmerge still undoes the loaded merge
    other.unmerge()
    assert torch.allclose(other.linear.weight, original, atol=1e-5)
