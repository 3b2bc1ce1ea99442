"""Adapters: combine_lora_states, save/load round trip, mismatch errors, merge, swap."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_gpt import SOURCE, TINY
from torch import nn

from lora_helpers.adapters import (
    base_fingerprint,
    combine_lora_states,
    forward_latency,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from lora_helpers.dora import dora_layers, merge_dora, replace_linear_with_dora
from lora_helpers.gpt2 import GPT2Source, GPTModel, classify_logits, to_classifier
from lora_helpers.lora import (
    load_lora_state_dict,
    lora_layers,
    lora_scaling,
    lora_state_dict,
    merge_lora,
    replace_linear_with_lora,
)
from lora_helpers.train import setup_mode


def _random_state(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.lora.A": torch.randn(6, rank, generator=g),
        "0.lora.B": torch.randn(rank, 5, generator=g),
        "2.lora.A": torch.randn(5, rank, generator=g),
        "2.lora.B": torch.randn(rank, 3, generator=g),
    }


def _delta(state: dict[str, torch.Tensor], layer: str, scaling: float) -> torch.Tensor:
    return scaling * state[f"{layer}.lora.A"] @ state[f"{layer}.lora.B"]


def test_combined_update_is_the_weighted_sum_of_updates():
    states = [_random_state(2, 0), _random_state(4, 1)]
    weights, scalings = [0.7, -1.5], [2.0, 0.25]
    combined = combine_lora_states(states, weights, scalings=scalings, new_scaling=0.5)
    for layer in ("0", "2"):
        expected = sum(
            w * _delta(s, layer, c) for w, s, c in zip(weights, states, scalings, strict=True)
        )
        assert combined[f"{layer}.lora.A"].shape[1] == 6  # ranks add up
        torch.testing.assert_close(_delta(combined, layer, 0.5), expected)


def test_combined_state_in_a_layer_of_summed_rank_gives_the_weighted_sum_of_outputs():
    torch.manual_seed(0)
    base, x = nn.Sequential(nn.Linear(6, 5)), torch.randn(4, 6)
    models = []
    for rank, alpha in ((1, 3.0), (2, 2.0)):
        model = replace_linear_with_lora(copy.deepcopy(base), rank, alpha)
        nn.init.normal_(model[0].lora.B)  # a trained-looking, non-zero update
        models.append(model)
    states = [lora_state_dict(m) for m in models]
    scalings = [m[0].lora.scaling for m in models]
    combined = replace_linear_with_lora(copy.deepcopy(base), 3, alpha=3)  # scaling 1
    load_lora_state_dict(combined, combine_lora_states(states, [0.5, 2.0], scalings=scalings))
    with torch.no_grad():
        expected = base(x) + 0.5 * (models[0](x) - base(x)) + 2.0 * (models[1](x) - base(x))
        torch.testing.assert_close(combined(x), expected)


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], [], "at least one"),
        ([_random_state(2, 0)], [1.0, 2.0], "one weight per state"),
        ([_random_state(2, 0)], [float("nan")], "finite"),
    ],
)
def test_combine_rejects_bad_input(states, weights, message):
    with pytest.raises(ValueError, match=message):
        combine_lora_states(states, weights, scalings=[1.0] * len(states))


def test_combine_needs_each_adapters_own_scaling():
    with pytest.raises(ValueError, match=r"Give each adapter's scaling.*rsLoRA"):
        combine_lora_states([_random_state(2, 0)], [1.0])
    model = replace_linear_with_lora(nn.Sequential(nn.Linear(6, 5)), 2, 4.0)
    with pytest.raises(ValueError, match="not a mix"):
        combine_lora_states([model, lora_state_dict(model)], [1.0, 1.0])
    with pytest.raises(ValueError, match="not a mix"):
        combine_lora_states([model], [1.0], scalings=[2.0])


@pytest.mark.parametrize("pass_models", [False, True])
@pytest.mark.parametrize(
    ("rank", "alpha", "rslora"),
    [(4, 4.0, True), (4, 8.0, False), (1, 3.0, True)],  # rsLoRA at alpha = rank: scaling 2, not 1
)
def test_an_adapter_combined_alone_at_weight_1_gives_back_its_own_update(
    rank, alpha, rslora, pass_models
):
    torch.manual_seed(0)
    base, x = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)), torch.randn(4, 6)
    model = replace_linear_with_lora(copy.deepcopy(base), rank, alpha, rslora=rslora)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora.B)
    if pass_models:  # each adapter's scaling read from its own layers
        state = combine_lora_states([model], [1.0])
    else:
        state = combine_lora_states([lora_state_dict(model)], [1.0], scalings=[lora_scaling(model)])
    again = replace_linear_with_lora(copy.deepcopy(base), rank, alpha=rank)  # scaling 1
    load_lora_state_dict(again, state)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_lora_scaling_refuses_a_model_without_one_scaling():
    model = replace_linear_with_lora(nn.Sequential(nn.Linear(6, 5)), 4, 8.0)
    assert lora_scaling(model) == 2.0
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_scaling(nn.Sequential(nn.Linear(6, 5)))
    mixed = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    replace_linear_with_lora(mixed, 4, 8.0, target_modules=["0"])
    replace_linear_with_lora(mixed, 4, 4.0, target_modules=["1"])
    with pytest.raises(ValueError, match=r"scalings \[1\.0, 2\.0\]"):
        lora_scaling(mixed)


def test_combine_rejects_states_of_different_layers_or_sizes():
    other = _random_state(2, 1)
    other.pop("2.lora.A")
    other.pop("2.lora.B")
    with pytest.raises(ValueError, match="same target modules"):
        combine_lora_states([_random_state(2, 0), other], [1.0, 1.0], scalings=[1.0, 1.0])
    wider = _random_state(2, 1)
    wider["0.lora.A"] = torch.randn(7, 2)
    with pytest.raises(ValueError, match="different base models"):
        combine_lora_states([_random_state(2, 0), wider], [1.0, 1.0], scalings=[1.0, 1.0])


# --------------------------------------------------------------- saving, loading, merging

IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))


def base_model(cfg: dict = TINY) -> GPTModel:
    """The same random 'pretrained' base every time."""
    torch.manual_seed(0)
    return GPTModel(cfg).eval()


def trained_lora(seed: int, rank: int = 2) -> GPTModel:
    """A classifier with LoRA whose A, B and head look trained (random, non-zero)."""
    torch.manual_seed(seed)
    model = setup_mode(to_classifier(base_model(), 2), "lora", rank=rank, alpha=4)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=0.1)
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return classify_logits(model, IDS)


def test_adapter_round_trip_into_a_fresh_base(tmp_path):
    model = trained_lora(seed=1)
    folder = save_adapter(model, tmp_path / "spam", SOURCE)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]
    config = read_adapter_config(folder)
    assert (config["rank"], config["alpha"], config["n_classes"]) == (2, 4.0, 2)
    assert config["targets"][0] == "trf_blocks.0.att.W_query"

    fresh = load_adapter(base_model(), folder, SOURCE)  # still has its LM head: replaced
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    saved = load_file(str(folder / "adapter.safetensors"))
    assert set(saved) == set(lora_state_dict(model)) | {"out_head.weight", "out_head.bias"}
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():  # as any file the user writes (safetensors' save_file: 0600)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_the_adapter_file_holds_only_lora_and_head(tmp_path):
    model = trained_lora(seed=1)
    folder = save_adapter(model, tmp_path / "spam", SOURCE)
    n_saved = sum(t.numel() for t in load_file(str(folder / "adapter.safetensors")).values())
    assert n_saved == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_fingerprint_ignores_lora_and_head_but_not_the_architecture():
    plain = base_model()
    assert base_fingerprint(plain) == base_fingerprint(trained_lora(seed=1))
    assert base_fingerprint(plain) != base_fingerprint(base_model({**TINY, "n_layers": 3}))


def test_loading_into_another_base_is_one_clear_error(tmp_path):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    with pytest.raises(ValueError, match=r"whose layers differ from this model's"):
        load_adapter(base_model({**TINY, "emb_dim": 64}), folder)
    pretrained = GPT2Source("tiny-test", True, "pretend pretrained")
    with pytest.raises(
        ValueError, match=r"trained on tiny-test \(random fallback weights\), not on"
    ):
        load_adapter(base_model(), folder, pretrained)


def test_loading_over_lora_of_other_settings_is_one_clear_error(tmp_path):
    folder = save_adapter(trained_lora(seed=1, rank=2), tmp_path / "spam", SOURCE)
    with pytest.raises(ValueError, match="other settings than the adapter"):
        load_adapter(trained_lora(seed=2, rank=4), folder)


def test_missing_or_foreign_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the folder that save_adapter wrote"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"rank": 8}')
    with pytest.raises(ValueError, match="is not a 'lora-from-scratch adapter v1' file"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[8]")
    with pytest.raises(ValueError, match="is not a 'lora-from-scratch adapter v1' file"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"rank": 8')
    with pytest.raises(ValueError, match=r"is damaged .*save the adapter again"):
        read_adapter_config(tmp_path)


def test_a_damaged_weights_file_is_a_clear_error_and_changes_nothing(tmp_path):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter\.safetensors cannot be read .*save the adapter"):
        load_adapter(model, folder)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_save_refuses_models_without_lora_or_merged(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(to_classifier(base_model(), 2), tmp_path, SOURCE)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(merge_lora(trained_lora(seed=1)), tmp_path, SOURCE)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):  # was FileExistsError
        save_adapter(trained_lora(seed=1), tmp_path / "a-file", SOURCE)


def test_merged_model_predicts_the_same(tmp_path):
    model = trained_lora(seed=1)
    before = logits(model)
    merge_lora(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(model).argmax(-1), before.argmax(-1))


def test_swapping_adapters_on_one_base(tmp_path):
    first, second = trained_lora(seed=1), trained_lora(seed=2)
    a = save_adapter(first, tmp_path / "a", SOURCE)
    b = save_adapter(second, tmp_path / "b", SOURCE)
    model = load_adapter(base_model(), a)
    torch.testing.assert_close(logits(model), logits(first), rtol=0, atol=0)
    load_adapter(model, b)
    torch.testing.assert_close(logits(model), logits(second), rtol=0, atol=0)
    load_adapter(model, a)
    torch.testing.assert_close(logits(model), logits(first), rtol=0, atol=0)


def test_forward_latency_is_a_positive_number_of_seconds():
    assert 0 < forward_latency(base_model(), IDS, repeats=3) < 10


def snapshot(model: nn.Module) -> dict:
    """Everything a refused load must leave as it was."""
    return {
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "tied": model.out_head.weight is model.tok_emb.weight,
        "training": model.training,
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["requires_grad"] == before["requires_grad"]
    assert (after["tied"], after["training"]) == (before["tied"], before["training"])


def break_adapter(folder, how: str) -> None:
    """Damage a saved adapter so that it passes the base checks but cannot fit."""
    path = folder / "adapter.safetensors"
    tensors = load_file(str(path))
    if how == "lora shape":  # a tensor of another rank than the config says
        key = next(k for k in tensors if k.endswith(".lora.B"))
        tensors[key] = torch.zeros(3, tensors[key].shape[1])
    elif how == "head shape":
        tensors["out_head.weight"] = torch.zeros(3, tensors["out_head.weight"].shape[1])
    elif how == "missing lora":
        tensors.pop(next(k for k in tensors if k.endswith(".lora.A")))
    elif how == "unknown target":
        config = json.loads((folder / "adapter_config.json").read_text())
        config["targets"] = [*config["targets"], "trf_blocks.0.att.W_nothing"]
        (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path))


@pytest.mark.parametrize("how", ["lora shape", "head shape", "missing lora", "unknown target"])
def test_a_refused_load_into_a_fresh_base_leaves_it_as_it_was(tmp_path, how):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    break_adapter(folder, how)
    model = base_model().train()
    before = snapshot(model)
    assert before["tied"]
    with pytest.raises(ValueError, match=r"do not fit|in the file but|Unknown target"):
        load_adapter(model, folder)
    assert_unchanged(model, before)


@pytest.mark.parametrize("how", ["lora shape", "head shape", "missing lora"])
def test_a_refused_swap_keeps_the_adapter_that_was_loaded(tmp_path, how):
    good = save_adapter(trained_lora(seed=1), tmp_path / "good", SOURCE)
    bad = save_adapter(trained_lora(seed=2), tmp_path / "bad", SOURCE)
    break_adapter(bad, how)
    model = load_adapter(base_model(), good)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"do not fit|in the file but"):
        load_adapter(model, bad)
    assert_unchanged(model, before)


# --------------------------------------------------------------- tied and shared weights


def lm_with_lora_on_every_linear(merge_kind: str = "lora") -> GPTModel:
    """The tiny GPT as a language model (out_head tied to tok_emb), every linear adapted."""
    model = base_model()
    assert model.out_head.weight is model.tok_emb.weight
    add = replace_linear_with_lora if merge_kind == "lora" else replace_linear_with_dora
    add(model, 4, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merging_into_a_tied_weight_is_refused_and_changes_nothing(kind):
    model = lm_with_lora_on_every_linear(kind)
    embedding = model.tok_emb.weight.detach().clone()
    before = logits(model)
    merge = merge_lora if kind == "lora" else merge_dora
    with pytest.raises(ValueError, match=r"'out_head' shares its memory with 'tok_emb\.weight'"):
        merge(model)
    assert torch.equal(model.tok_emb.weight, embedding)
    assert not any(m.merged for _, m in [*lora_layers(model), *dora_layers(model)])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_linear_used_at_two_places_is_refused_at_wrap_time(kind):
    shared = nn.Linear(8, 8)
    model = nn.Sequential()
    model.add_module("first", shared)
    model.add_module("act", nn.ReLU())
    model.add_module("second", shared)  # the same module object again
    add = replace_linear_with_lora if kind == "lora" else replace_linear_with_dora
    for targets in (None, ["second"]):
        with pytest.raises(ValueError, match=r"'first' and 'second' are one nn.Linear used at 2"):
            add(model, 2, 4, target_modules=targets)
    assert model.first is model.second is shared  # nothing wrapped


@pytest.mark.parametrize("alias", ["data", "transposed view"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merging_into_memory_shared_another_way_is_refused(kind, alias):
    """Ties made by hand: `.data` aliases and views share memory, not the Parameter object."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    if alias == "data":
        model[2].weight.data = model[0].weight.data
    else:
        model[2].weight = nn.Parameter(model[0].weight.data.T)
    add = replace_linear_with_lora if kind == "lora" else replace_linear_with_dora
    add(model, 2, 4, target_modules=["0"])
    with torch.no_grad():
        model[0].lora.B.normal_()
    other = model[2].weight.detach().clone()
    merge = merge_lora if kind == "lora" else merge_dora
    with pytest.raises(ValueError, match=r"'0' shares its memory with '2\.weight'"):
        merge(model)
    assert torch.equal(model[2].weight, other)


def test_untied_on_purpose_the_merge_goes_ahead_and_leaves_the_embedding_alone():
    model = lm_with_lora_on_every_linear()
    head = model.out_head.linear
    head.weight = nn.Parameter(head.weight.detach().clone())
    embedding = model.tok_emb.weight.detach().clone()
    before = logits(model)
    merge_lora(model)
    assert torch.equal(model.tok_emb.weight, embedding)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_an_lm_adapter_leaves_the_tied_embedding_to_the_base(tmp_path):
    model = lm_with_lora_on_every_linear()
    folder = save_adapter(model, tmp_path / "lm", SOURCE)
    saved = load_file(str(folder / "adapter.safetensors"))
    assert not any(k.startswith("out_head.") and ".lora." not in k for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(
        p.numel() for n, p in model.named_parameters() if ".lora." in n
    )
    fresh = load_adapter(base_model(), folder, SOURCE)
    assert fresh.out_head.linear.weight is fresh.tok_emb.weight  # still tied
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


# --------------------------------------------------------------- same shapes, other weights


def test_an_adapter_does_not_load_into_another_base_of_the_same_shapes(tmp_path):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    probe = read_adapter_config(folder)["base_probe"]
    assert "tok_emb.weight" in probe
    assert any(".att.W_query." in key or ".ff." in key for key in probe)  # blocks too
    torch.manual_seed(1)  # the stand-in of another seed: same shapes, other weights
    other = GPTModel(TINY).eval()
    assert base_fingerprint(other) == base_fingerprint(base_model())
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"whose weights differ from this model's \(same shapes"):
        load_adapter(other, folder, SOURCE)
    assert_unchanged(other, before)


def _probed_block_weight(model: GPTModel, folder) -> torch.Tensor:
    """A probed matrix inside the transformer blocks (what fine-tuning a block changes)."""
    key = next(k for k in read_adapter_config(folder)["base_probe"] if k.startswith("trf_"))
    return model.get_parameter(key)


@pytest.mark.parametrize(
    ("where", "change", "loads"),
    [
        ("embedding", 1e-2, False),  # 1 %: another base
        ("blocks", 1e-2, False),  # e.g. a base whose last block was fine-tuned
        ("embedding", 1e-7, True),  # float32 round-off: another CPU's stand-in
        ("blocks", 1e-7, True),
    ],
)
def test_the_weight_probe_tells_other_weights_from_round_off(tmp_path, where, change, loads):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    model = base_model()
    weight = model.tok_emb.weight if where == "embedding" else _probed_block_weight(model, folder)
    with torch.no_grad():
        weight.mul_(1 + change)
    if loads:
        load_adapter(model, folder, SOURCE)
    else:
        with pytest.raises(ValueError, match="whose weights differ"):
            load_adapter(model, folder, SOURCE)


@pytest.mark.parametrize("dtypes", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_the_same_base_in_another_precision_still_loads(tmp_path, dtypes):
    trained_in, loaded_in = (getattr(torch, d) for d in dtypes)
    model = trained_lora(seed=1).to(trained_in)
    folder = save_adapter(model, tmp_path / "spam", SOURCE)
    load_adapter(base_model().to(loaded_in), folder, SOURCE)


def test_an_adapter_without_a_probe_still_loads(tmp_path):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["base_probe"]  # written before probes existed
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(
        logits(load_adapter(base_model(), folder)), logits(trained_lora(seed=1)), rtol=0, atol=0
    )


def test_a_head_tensor_missing_or_foreign_is_refused_and_changes_nothing(tmp_path):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    path = folder / "adapter.safetensors"
    good = load_file(str(path))
    for broken in (
        {k: v for k, v in good.items() if k != "out_head.bias"},  # a head without its bias
        {**good, "tok_emb.weight": torch.zeros(TINY["vocab_size"], TINY["emb_dim"])},
    ):
        save_file(broken, str(path))
        model = base_model()
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"are not this model's head"):
            load_adapter(model, folder)
        assert_unchanged(model, before)


def test_a_refused_load_with_suffix_targets_unwraps_everything_it_wrapped(tmp_path):
    folder = save_adapter(trained_lora(seed=1), tmp_path / "spam", SOURCE)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["targets"] = ["W_query"]  # a suffix, as replace_linear_with_lora accepts
    del config["base_probe"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = base_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(model, folder)
    assert_unchanged(model, before)


def test_forward_latency_refuses_repeats_below_one():
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        forward_latency(base_model(), IDS, repeats=0)
