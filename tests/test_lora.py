"""lora_helpers.lora: shapes, initialisation, gradient flow, merging, counting, LoRA state dicts."""

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
from lora_helpers.lora import (
    LinearWithLoRA,
    LoRALayer,
    ParameterCount,
    RankWarning,
    count_parameters,
    freeze,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W_query = nn.Linear(8, 8)
        self.W_value = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.W_query(x) + self.W_value(x))


class TinyNet(nn.Module):
    """Two blocks and a head: linear layers named like a transformer's, at two depths."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def randomize_B(model: nn.Module, seed: int = 1) -> None:
    """Give every LoRA B nonzero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g))


# --- LoRALayer -------------------------------------------------------------------------


def test_lora_layer_shapes_and_zero_output_at_init():
    layer = LoRALayer(in_dim=10, out_dim=6, rank=3, alpha=6)
    assert layer.A.shape == (10, 3)
    assert layer.B.shape == (3, 6)
    assert torch.count_nonzero(layer.B) == 0
    y = layer(torch.randn(2, 5, 10))
    assert y.shape == (2, 5, 6)
    assert torch.count_nonzero(y) == 0


def test_A_is_initialised_like_nn_linear_with_fan_in_in_dim():
    torch.manual_seed(0)
    in_dim, rank = 1024, 4
    A = LoRALayer(in_dim, 64, rank, alpha=4).A.detach()
    bound = 1 / math.sqrt(in_dim)  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), ...)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.98 * bound  # uses the whole range, not a narrower one
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    reference = nn.Linear(in_dim, rank).weight.detach()  # the same distribution
    assert A.std().item() == pytest.approx(reference.std().item(), rel=0.05)


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_and_forward(rslora, expected):
    torch.manual_seed(0)
    layer = LoRALayer(5, 7, rank=4, alpha=16, rslora=rslora)
    randomize = torch.randn(4, 7)
    with torch.no_grad():
        layer.B.copy_(randomize)
    x = torch.randn(3, 5)
    assert layer.scaling == expected
    torch.testing.assert_close(layer(x), expected * x @ layer.A @ layer.B)


def test_delta_weight_is_the_update_in_linear_layout():
    torch.manual_seed(0)
    layer = LoRALayer(5, 7, rank=2, alpha=3)
    with torch.no_grad():
        layer.B.normal_()
    delta = layer.delta_weight()
    assert delta.shape == (7, 5)  # (out_dim, in_dim), like nn.Linear.weight
    x = torch.randn(4, 5)
    torch.testing.assert_close(x @ delta.T, layer(x))
    assert torch.linalg.matrix_rank(delta) == 2


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = LoRALayer(32, 8, rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(16, 32)
    expected = layer.scaling * x @ layer.A @ layer.B
    assert not torch.allclose(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)


def test_extra_repr_names_the_scaling_rule():
    assert "scaling=alpha/rank=2" in repr(LoRALayer(4, 4, 2, 4))
    assert "scaling=alpha/sqrt(rank)=2" in repr(LoRALayer(4, 4, 4, 4, rslora=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -2}, "rank must be a positive integer"),
        ({"rank": 2.0}, "rank must be a positive integer"),
        ({"rank": True}, "rank must be a positive integer"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"alpha": float("inf")}, "alpha must be a finite number"),
        ({"alpha": "8"}, "alpha must be a finite number"),
        ({"alpha": True}, "alpha must be a finite number"),
        ({"in_dim": 0}, "in_dim must be a positive integer"),
        ({"out_dim": 3.0}, "out_dim must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0.1'"),
        ({"dropout": None}, r"dropout must be a number in \[0, 1\), got None"),
        ({"alpha": 0}, "alpha is 0, which scales the update to zero"),
        ({"rslora": "no"}, "rslora must be True or False, got 'no'"),
    ],
)
def test_lora_layer_rejects_bad_arguments(kwargs, message):
    args = {"in_dim": 4, "out_dim": 6, "rank": 2, "alpha": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        LoRALayer(**args)


@pytest.mark.parametrize("wrapper", [LinearWithLoRA, LinearWithDoRA])
@pytest.mark.parametrize("kwargs", [{"rank": 0, "alpha": 8}, {"rank": 4, "alpha": float("nan")}])
def test_a_refused_wrapper_leaves_the_layer_trainable(wrapper, kwargs):
    linear = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"(rank|alpha) must be"):
        wrapper(linear, **kwargs)
    assert all(p.requires_grad for p in linear.parameters())


def test_an_empty_target_list_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is empty"):
        replace_linear_with_lora(model, 2, 2, [])
    assert isinstance(model[0], nn.Linear)


# --- LinearWithLoRA --------------------------------------------------------------------


def test_linear_with_lora_is_identity_at_init_and_freezes_the_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 5)
    layer = LinearWithLoRA(base, rank=3, alpha=6)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad
    assert not base.bias.requires_grad
    assert layer.lora.A.requires_grad
    assert layer.lora.B.requires_grad


def test_only_A_and_B_receive_gradients():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(12, 5), rank=3, alpha=6)
    x = torch.randn(4, 12)
    layer(x).square().sum().backward()
    assert layer.linear.weight.grad is None
    assert layer.linear.bias.grad is None
    # With B = 0 the gradient of A (which flows through B) is zero at the first step; B's is not.
    assert torch.count_nonzero(layer.lora.A.grad) == 0
    assert torch.count_nonzero(layer.lora.B.grad) > 0

    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    weight_before = layer.linear.weight.clone()
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    assert torch.count_nonzero(layer.lora.A.grad) > 0  # once B moved, A learns too
    assert torch.equal(layer.linear.weight, weight_before)


def test_merge_gives_the_same_outputs_without_the_lora_path():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 9), rank=4, alpha=8)
    randomize_B(layer)
    x = torch.randn(5, 16)
    expected = layer(x)
    weight = layer.linear.weight.clone()

    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.linear.weight, weight + layer.lora.delta_weight())

    def fail(_x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a merged layer must not run the LoRA path")

    layer.lora.forward = fail
    torch.testing.assert_close(layer(x), expected)
    layer.merge()  # a second merge changes nothing
    torch.testing.assert_close(layer(x), expected)
    del layer.lora.forward

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.linear.weight, weight)
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()  # a second unmerge changes nothing
    torch.testing.assert_close(layer.linear.weight, weight)


def test_lora_follows_the_dtype_of_the_base():
    layer = LinearWithLoRA(nn.Linear(6, 4).double(), rank=2, alpha=2)
    assert layer.lora.A.dtype == torch.float64
    assert layer(torch.randn(3, 6, dtype=torch.float64)).dtype == torch.float64


def test_linear_with_lora_rejects_non_linear_layers():
    with pytest.raises(TypeError, match=r"wraps an nn\.Linear, got Conv1d"):
        LinearWithLoRA(nn.Conv1d(4, 4, 1), rank=2, alpha=2)

    class Conv1D(nn.Module):  # the name of Hugging Face GPT-2's projection class
        pass

    with pytest.raises(TypeError, match="Hugging Face GPT-2 stores its projections"):
        LinearWithLoRA(Conv1D(), rank=2, alpha=2)


def test_a_rank_above_min_in_out_is_allowed_with_a_warning_that_counts_the_waste():
    with pytest.warns(RankWarning, match=r"rank 5 is larger than min\(in_dim=8, out_dim=4\)") as w:
        layer = LinearWithLoRA(nn.Linear(8, 4), rank=5, alpha=5)
    assert "12 of its parameters buy nothing. Rank 4 gives the same updates." in str(w[0].message)
    assert layer.lora.A.shape == (8, 5)
    with pytest.warns(RankWarning, match=r"rank 5 is larger than min\(in_dim=4, out_dim=6\)"):
        LoRALayer(4, 6, rank=5, alpha=5)


def test_the_books_recipe_runs_with_one_warning_that_names_the_layer():
    """The reference appendix: replace_linear_with_lora(model, rank=16, alpha=16) on a model whose
    2-class head is smaller than the rank. PEFT accepts it too."""
    model = TinyNet()  # head: 8 -> 3
    with pytest.warns(RankWarning) as caught:
        replace_linear_with_lora(model, rank=4, alpha=4)
    assert len(caught) == 1
    assert "rank 4 is larger than min(in, out) of 1 layer(s): 'head' (8 -> 3)" in str(
        caught[0].message
    )
    assert len(list(lora_layers(model))) == 5
    lora_params = 4 * 4 * (8 + 8) + 4 * (8 + 3)  # four 8 -> 8 layers and the 8 -> 3 head
    assert count_parameters(mark_only_lora_as_trainable(model)).trainable == lora_params


def test_matches_peft_lora_on_the_same_weights():
    peft = pytest.importorskip("peft")
    for rslora in (False, True):
        torch.manual_seed(0)
        base = nn.Sequential()
        base.add_module("proj", nn.Linear(10, 6))
        ours = LinearWithLoRA(nn.Linear(10, 6), rank=4, alpha=8, rslora=rslora)
        ours.linear.load_state_dict(base.proj.state_dict())
        randomize_B(ours)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["proj"], use_rslora=rslora, lora_dropout=0.0
        )
        theirs = peft.get_peft_model(base, config).base_model.model.proj
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(ours.lora.A.T)  # peft stores (rank, in)
            theirs.lora_B["default"].weight.copy_(ours.lora.B.T)  # and (out, rank)
        x = torch.randn(3, 10)
        torch.testing.assert_close(ours(x), theirs(x))


# --- replace_linear_with_lora and model-wide helpers -----------------------------------


def test_replace_all_linear_layers():
    model = TinyNet()
    assert replace_linear_with_lora(model, rank=2, alpha=4) is model
    names = [name for name, _ in lora_layers(model)]
    assert names == [
        "blocks.0.W_query",
        "blocks.0.W_value",
        "blocks.1.W_query",
        "blocks.1.W_value",
        "head",
    ]


def test_replace_only_the_targets_by_dotted_suffix():
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(4, 8)
    before = model(x)
    replace_linear_with_lora(model, rank=2, alpha=4, target_modules=["W_query", "blocks.1.W_value"])
    names = [name for name, _ in lora_layers(model)]
    assert names == ["blocks.0.W_query", "blocks.1.W_query", "blocks.1.W_value"]
    assert isinstance(model.head, nn.Linear)
    assert torch.equal(model(x), before)  # identity at initialisation, model-wide


def test_a_string_target_is_one_name():
    model = replace_linear_with_lora(TinyNet(), rank=2, alpha=4, target_modules="head")
    assert [name for name, _ in lora_layers(model)] == ["head"]


def test_unknown_target_lists_the_layer_names():
    with pytest.raises(ValueError, match=r"Unknown target module\(s\) \['query'\]") as info:
        replace_linear_with_lora(TinyNet(), rank=2, alpha=4, target_modules=["query"])
    assert "['W_query', 'W_value', 'head']" in str(info.value)


def test_replace_twice_does_not_wrap_a_wrapped_layer():
    model = replace_linear_with_lora(TinyNet(), rank=2, alpha=4, target_modules=["W_query"])
    replace_linear_with_lora(model, rank=2, alpha=4)  # now the rest
    assert len(list(lora_layers(model))) == 5
    assert not any(isinstance(m.linear, LinearWithLoRA) for _, m in lora_layers(model))
    with pytest.raises(ValueError, match=r"no nn\.Linear layer.*already a LinearWithLoRA"):
        replace_linear_with_lora(model, rank=2, alpha=4)


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("dora", "lora"),  # forward used to fail later: 'LinearWithLoRA' has no attribute 'weight'
        ("lora", "dora"),  # used to stack silently: DoRA around LoRA's inner layer
        ("dora", "dora-targets"),
        ("lora", "lora-targets"),  # a named layer that already carries LoRA
    ],
)
def test_a_second_adapter_on_an_adapted_layer_is_refused_at_wrap_time(first, second):
    add = {"lora": replace_linear_with_lora, "dora": replace_linear_with_dora}
    model = add[first](TinyNet(), 2, 4, target_modules=["W_query"])
    before = _structure(model)
    kind, _, targets = second.partition("-")
    wrapped = {"lora": "LinearWithLoRA", "dora": "LinearWithDoRA"}
    with pytest.raises(ValueError, match=r"Layer 'blocks\.0\.W_query' \(and 1 more\)") as info:
        add[kind](model, 2, 4, target_modules=["W_query"] if targets else None)
    assert f"already carries a {wrapped[first]}; a {wrapped[kind]} on top" in str(info.value)
    assert _structure(model) == before  # refused before anything was wrapped


def test_other_layers_can_still_get_another_kind_of_adapter():
    model = replace_linear_with_dora(TinyNet(), 2, 4, target_modules=["W_query"])
    replace_linear_with_lora(model, 2, 4, target_modules=["W_value", "head"])
    assert [n for n, _ in dora_layers(model)] == ["blocks.0.W_query", "blocks.1.W_query"]
    assert [n for n, _ in lora_layers(model)] == ["blocks.0.W_value", "blocks.1.W_value", "head"]
    assert model(torch.randn(3, 8)).shape == (3, 3)


def test_replace_explains_a_model_without_linear_layers():
    class Conv1D(nn.Module):
        pass

    model = nn.Sequential(nn.ReLU())
    model.add_module("c_attn", Conv1D())
    with pytest.raises(ValueError, match=r"no nn.Linear.*1 transformers Conv1D layers"):
        replace_linear_with_lora(model, rank=2, alpha=4)


def test_replace_rejects_bad_rank_and_alpha():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        replace_linear_with_lora(TinyNet(), rank=0, alpha=4)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        replace_linear_with_lora(TinyNet(), rank=2, alpha=float("nan"))


def test_freeze_and_mark_only_lora_as_trainable_give_exact_counts():
    model = TinyNet()
    # 4 projections of 8*8+8 and the head 8*3+3, 2 LayerNorms of 2*8
    total = 4 * 72 + 27 + 2 * 16
    assert count_parameters(model) == ParameterCount(total, total)
    assert freeze(model) is model
    assert count_parameters(model) == ParameterCount(total, 0)

    replace_linear_with_lora(model, rank=2, alpha=4, target_modules=["W_query", "W_value"])
    assert mark_only_lora_as_trainable(model) is model
    lora = 4 * 2 * (8 + 8)  # each adapted projection adds rank * (in + out)
    assert count_parameters(model) == ParameterCount(total + lora, lora)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.endswith(("lora.A", "lora.B")) for name in trainable)
    assert len(trainable) == 8


def test_count_parameters_counts_shared_weights_once():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as in GPT-2
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    assert count_parameters(model).total == 40


def test_parameter_count_fraction_and_text():
    count = ParameterCount(total=1_000_000, trainable=2_500)
    assert count.trainable_fraction == 0.0025
    assert str(count) == "total 1,000,000 | trainable 2,500 (0.25 %)"
    assert ParameterCount(0, 0).trainable_fraction == 0.0


def test_merge_lora_and_unmerge_lora_on_a_model():
    torch.manual_seed(0)
    model = replace_linear_with_lora(TinyNet(), rank=2, alpha=4)
    randomize_B(model)
    x = torch.randn(4, 8)
    expected = model(x)
    assert merge_lora(model) is model
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(model(x), expected)
    assert unmerge_lora(model) is model
    assert not any(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(model(x), expected)


# --- LoRA state dicts ------------------------------------------------------------------


def adapted(seed: int) -> TinyNet:
    torch.manual_seed(0)  # the same base weights every time
    model = replace_linear_with_lora(TinyNet(), rank=2, alpha=4, target_modules=["W_query"])
    randomize_B(model, seed)
    return model


def test_lora_state_dict_holds_only_lora_tensors_detached():
    model = adapted(seed=1)
    state = lora_state_dict(model)
    assert sorted(state) == [
        "blocks.0.W_query.lora.A",
        "blocks.0.W_query.lora.B",
        "blocks.1.W_query.lora.A",
        "blocks.1.W_query.lora.B",
    ]
    assert all(not t.requires_grad for t in state.values())
    assert torch.equal(state["blocks.1.W_query.lora.B"], model.blocks[1].W_query.lora.B)


def test_load_lora_state_dict_round_trip():
    source, target = adapted(seed=1), adapted(seed=2)
    x = torch.randn(3, 8)
    assert not torch.allclose(source(x), target(x))
    load_lora_state_dict(target, lora_state_dict(source))
    torch.testing.assert_close(target(x), source(x))


def test_load_lora_state_dict_errors():
    state = lora_state_dict(adapted(seed=1))
    with pytest.raises(ValueError, match="has no LoRA layers; call replace_linear_with_lora"):
        load_lora_state_dict(TinyNet(), state)

    merged = merge_lora(adapted(seed=2))
    with pytest.raises(ValueError, match="merged; call unmerge_lora"):
        load_lora_state_dict(merged, state)

    other_targets = replace_linear_with_lora(TinyNet(), rank=2, alpha=4, target_modules=["head"])
    with pytest.raises(ValueError, match=r"missing \['head.lora.A', 'head.lora.B'\]"):
        load_lora_state_dict(other_targets, state)

    wrong_rank = replace_linear_with_lora(TinyNet(), rank=3, alpha=4, target_modules=["W_query"])
    with pytest.raises(ValueError, match=r"has shape \(8, 2\) in the file but \(8, 3\)"):
        load_lora_state_dict(wrong_rank, state)


def test_replace_refuses_a_bare_linear_and_names_the_single_layer_class():
    with pytest.raises(TypeError, match=r"for a single layer use LinearWithLoRA\(linear"):
        replace_linear_with_lora(nn.Linear(4, 4), rank=2, alpha=4)


# --------------------------------------------------------------- merged is part of the state


def _mlp(kind: str = "lora", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add = replace_linear_with_lora if kind == "lora" else replace_linear_with_dora
    add(model, 2, 4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize(("saved_merged", "loaded_merged"), [(True, False), (False, True)])
def test_a_state_loads_as_merged_or_not_as_it_was_saved(kind, saved_merged, loaded_merged):
    merge = merge_lora if kind == "lora" else merge_dora
    x = torch.randn(5, 8)
    saved = _mlp(kind, seed=0)
    with torch.no_grad():
        expected = saved(x)
    if saved_merged:
        merge(saved)
    other = _mlp(kind, seed=3)  # same settings, other weights
    if loaded_merged:
        merge(other)
    other.load_state_dict(saved.state_dict())  # strict
    assert [other[i].merged for i in (0, 2)] == [saved_merged] * 2
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)


def test_a_plain_layers_state_is_unmerged_and_a_partial_one_changes_nothing():
    x = torch.randn(5, 8)
    merged = merge_lora(_mlp(seed=0))
    plain = {k: v for k, v in _mlp(seed=0).state_dict().items() if not k.endswith("merged_flag")}
    merged.load_state_dict(plain)  # like a from-scratch layer's state: no flag, unmerged weight
    assert not merged[0].merged
    torch.testing.assert_close(merged(x), _mlp(seed=0)(x))
    merge_lora(merged)
    merged.load_state_dict(lora_state_dict(_mlp(seed=0)), strict=False)  # A and B only
    assert merged[0].merged


def test_a_layer_the_wrapper_refuses_leaves_the_whole_model_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[1].zero_()  # a zero row: DoRA cannot take its direction
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"Layer '2': Row 1 .* Nothing was wrapped\."):
        replace_linear_with_dora(model, 2, 4)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())  # not frozen either
    replace_linear_with_lora(model, 2, 4)  # the advice (use LoRA there) now works


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_new_adapter_layers_start_in_the_mode_of_the_layer_they_replace(kind):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    if kind == "lora":
        replace_linear_with_lora(model, 2, 4, dropout=0.5)
    else:
        replace_linear_with_dora(model, 2, 4)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        for _, layer in [*lora_layers(model), *dora_layers(model)]:
            layer.lora.B.normal_()
        x = torch.randn(3, 8)
        assert torch.equal(model(x), model(x))  # no dropout in an eval model


def test_dora_counts_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(768, 768), nn.Linear(768, 2))
    replace_linear_with_dora(model, 4, 8, target_modules=["0"])
    assert count_parameters(mark_only_dora_as_trainable(model)).trainable == 4 * 1536 + 768


def layer_with_an_update() -> tuple[LinearWithLoRA, torch.Tensor]:
    """A 16 -> 8 LinearWithLoRA whose B is not zero, and a copy of its base weight."""
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8), rank=4, alpha=8)
    nn.init.normal_(layer.lora.B)
    return layer, layer.linear.weight.detach().clone()


def test_unmerge_subtracts_what_merge_added_even_if_a_and_b_changed_in_between():
    layer, original = layer_with_an_update()
    layer.merge()
    with torch.no_grad():  # an optimizer step with gradients left from before the merge, say
        layer.lora.B.mul_(2)
        layer.lora.A.add_(1)
    layer.unmerge()
    assert torch.allclose(layer.linear.weight, original, atol=1e-6)
    x = torch.randn(3, 16)  # and the LoRA path now carries the changed A and B
    assert torch.allclose(layer(x), x @ original.T + layer.linear.bias + layer.lora(x), atol=1e-6)


def test_a_merged_state_loaded_from_a_file_unmerges_with_the_a_and_b_loaded_with_it():
    saved, original = layer_with_an_update()
    saved.merge()
    layer = LinearWithLoRA(nn.Linear(16, 8), rank=4, alpha=8)
    layer.load_state_dict(saved.state_dict())
    assert layer.merged
    with torch.no_grad():
        layer.lora.B.zero_()
    layer.unmerge()
    assert torch.allclose(layer.linear.weight, original, atol=1e-6)


def test_a_merged_layer_moved_or_copied_still_unmerges():
    layer, original = layer_with_an_update()
    layer.merge()
    twin = copy.deepcopy(layer).to(torch.float64)
    twin.unmerge()
    assert torch.allclose(twin.linear.weight, original.double(), atol=1e-6)


class TiedLM(nn.Module):
    """An embedding and an output head that share one weight, as GPT-2's tok_emb and out_head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(10, 4)
        self.out_head = nn.Linear(4, 10, bias=False)
        self.out_head.weight = self.tok_emb.weight


def test_merging_one_layer_whose_weight_is_tied_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = replace_linear_with_lora(TiedLM(), rank=2, alpha=4)
    nn.init.normal_(model.out_head.lora.B)
    embedding = model.tok_emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"shares its memory with 'tok_emb.weight'.*untie it"):
        model.out_head.merge()
    assert not model.out_head.merged
    assert torch.equal(model.tok_emb.weight, embedding)
    # untied as the message says, the layer merges and the embedding stays as it was
    layer = model.out_head
    layer.linear.weight = nn.Parameter(layer.linear.weight.detach().clone())
    layer.merge()
    assert layer.merged
    assert torch.equal(model.tok_emb.weight, embedding)


def test_lora_functions_refuse_a_model_whose_adapters_are_dora_layers():
    model = replace_linear_with_dora(Block(), rank=2, alpha=4)
    for call in (merge_lora, unmerge_lora, lora_state_dict, mark_only_lora_as_trainable):
        with pytest.raises(ValueError, match=r"adapters are LinearWithDoRA .*merge_dora"):
            call(model)
    with pytest.raises(ValueError, match=r"adapters are LinearWithDoRA"):
        load_lora_state_dict(model, {})
    assert not any(layer.merged for _, layer in dora_layers(model))


def test_dora_functions_refuse_a_model_whose_adapters_are_lora_layers():
    model = replace_linear_with_lora(Block(), rank=2, alpha=4)
    for call in (merge_dora, mark_only_dora_as_trainable):
        with pytest.raises(ValueError, match=r"adapters are LinearWithLoRA .*merge_lora"):
            call(model)
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_mark_only_lora_as_trainable_counts_lora_on_a_quantised_base():
    from lora_helpers.quant import add_lora_to_quantized, quantize_linears

    model = add_lora_to_quantized(quantize_linears(Block(), block_size=8), rank=2, alpha=4)
    mark_only_lora_as_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora.{f}" for n in ("W_query", "W_value") for f in "AB"}


def test_a_numpy_rank_or_alpha_gets_the_fix():
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=r"pass int\(rank\)"):
        LoRALayer(8, 8, rank=np.int64(4), alpha=8)
    with pytest.raises(ValueError, match=r"pass float\(alpha\); its type is float32, not float\.$"):
        LoRALayer(8, 8, rank=4, alpha=np.float32(8))


def test_a_nan_alpha_gets_the_usual_hint_not_the_numpy_one():
    with pytest.raises(ValueError, match=r"got nan; a common choice is alpha = rank\.$"):
        LoRALayer(8, 8, rank=4, alpha=math.nan)


def test_untying_from_the_embedding_side_lets_the_whole_model_merge():
    torch.manual_seed(0)
    model = replace_linear_with_lora(TiedLM(), rank=2, alpha=4)
    model.tok_emb.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    merge_lora(model)
    assert model.out_head.merged


def test_merge_lora_refuses_before_merging_any_layer():
    torch.manual_seed(0)
    tied = TiedLM()
    model = nn.ModuleDict({"block": Block(), "tok_emb": tied.tok_emb, "out_head": tied.out_head})
    replace_linear_with_lora(model, rank=2, alpha=4)  # the block's layers come first
    outside = model.tok_emb
    del model["tok_emb"]  # the tie is now with a module outside the model: only the layer knows
    assert outside.weight is model.out_head.linear.weight
    with pytest.raises(ValueError, match=r"shares its memory with 'tok_emb\.weight'"):
        merge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_loading_only_a_and_b_into_a_merged_layer_keeps_what_merge_added():
    layer, original = layer_with_an_update()
    layer.merge()
    other = {"lora.A": torch.randn(16, 4), "lora.B": torch.randn(4, 8)}
    layer.load_state_dict(other, strict=False)
    layer.unmerge()
    assert torch.allclose(layer.linear.weight, original, atol=1e-6)


def test_mark_only_lora_as_trainable_leaves_dora_layers_of_a_mixed_model_frozen():
    model = replace_linear_with_lora(Block(), rank=2, alpha=4, target_modules=["W_query"])
    replace_linear_with_dora(model, rank=2, alpha=4, target_modules=["W_value"])
    mark_only_lora_as_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"W_query.lora.A", "W_query.lora.B"}


def test_a_layer_pickled_before_merged_update_existed_still_unmerges():
    layer, original = layer_with_an_update()
    layer.merge()
    del layer.merged_update, layer.shared_with  # as unpickled from the older code
    layer.unmerge()
    assert torch.allclose(layer.linear.weight, original, atol=1e-6)
    layer.merge()


def test_mark_only_lora_as_trainable_refuses_a_model_without_lora_changing_nothing():
    model = TinyNet()
    with pytest.raises(ValueError, match=r"no LoRA layers.*replace_linear_with_lora"):
        mark_only_lora_as_trainable(model)
    assert all(p.requires_grad for p in model.parameters())


def test_mark_only_lora_as_trainable_on_a_quantised_model_points_to_add_lora_to_quantized():
    from lora_helpers.quant import add_lora_to_quantized, quantize_linears

    model = quantize_linears(TinyNet(), block_size=8)
    with pytest.raises(ValueError, match=r"no LoRA layers.*with quant\.add_lora_to_quantized\("):
        mark_only_lora_as_trainable(model)
    mark_only_lora_as_trainable(add_lora_to_quantized(model, 2, 2))
