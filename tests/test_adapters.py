"""Adapters: combine_lora_states, save/load round trip, mismatch errors, merge, swap."""

import copy

import pytest
import torch
from safetensors.torch import load_file
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
from lora_helpers.gpt2 import GPT2Source, GPTModel, classify_logits, to_classifier
from lora_helpers.lora import (
    load_lora_state_dict,
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
        combine_lora_states(states, weights)


def test_combine_rejects_states_of_different_layers_or_sizes():
    other = _random_state(2, 1)
    other.pop("2.lora.A")
    other.pop("2.lora.B")
    with pytest.raises(ValueError, match="same target modules"):
        combine_lora_states([_random_state(2, 0), other], [1.0, 1.0])
    wider = _random_state(2, 1)
    wider["0.lora.A"] = torch.randn(7, 2)
    with pytest.raises(ValueError, match="different base models"):
        combine_lora_states([_random_state(2, 0), wider], [1.0, 1.0])


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


def test_save_refuses_models_without_lora_or_merged(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(to_classifier(base_model(), 2), tmp_path, SOURCE)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(merge_lora(trained_lora(seed=1)), tmp_path, SOURCE)


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
