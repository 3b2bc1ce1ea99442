"""Adapters: combine_lora_states, save/load round trip, mismatch errors, merge, swap."""

import copy

import pytest
import torch
from torch import nn

from lora_helpers.adapters import combine_lora_states
from lora_helpers.lora import load_lora_state_dict, lora_state_dict, replace_linear_with_lora


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
