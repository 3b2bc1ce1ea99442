"""Helpers leave the caller's model as they found it: train/eval modes, requires_grad, dtype, device.

Each helper gets a model in a deliberately mixed state (train mode, with one block in eval
mode, some parameters frozen) and must hand it back in exactly that state. Helpers that
only look at the model must not change its values either; trainers change only the values
of the parameters they train.
"""

import copy

import pytest
import torch
from tiny_gpt import SOURCE, TINY
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_helpers import studies, toy_tasks
from lora_helpers.adapters import base_fingerprint, forward_latency, save_adapter
from lora_helpers.gpt2 import GPTModel, classify_logits, generate, to_classifier
from lora_helpers.lora import evaluating
from lora_helpers.train import classify_texts, evaluate, setup_mode, train_classifier

# GPT-2's vocabulary (padding uses its last id) with tiny layers: classify_texts pads with it.
WIDE_VOCAB = {**TINY, "vocab_size": 50257, "emb_dim": 16, "n_layers": 1, "drop_rate": 0.1}
CPU = torch.device("cpu")


class FakeTokenizer:
    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]


def classifier() -> GPTModel:
    torch.manual_seed(0)
    model = setup_mode(to_classifier(GPTModel(WIDE_VOCAB), 2), "lora", rank=2, alpha=4)
    return mixed_state(model, model.trf_blocks[0])


def mixed_state(model: nn.Module, eval_part: nn.Module) -> nn.Module:
    """Train mode, except `eval_part`; the first trainable parameter frozen."""
    model.train()
    eval_part.eval()
    next(p for p in model.parameters() if p.requires_grad).requires_grad_(False)
    return model


def state_of(model: nn.Module) -> dict:
    return {
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "params": [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()],
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def loader(n: int = 6) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 8), generator=g)
    return DataLoader(TensorDataset(ids, torch.arange(n) % 2), batch_size=3)


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))

OBSERVERS = {
    "evaluate": lambda m, tmp: evaluate(m, loader(), CPU),
    "classify_texts": lambda m, tmp: classify_texts(
        m, ["win a prize", "see you"], FakeTokenizer(), 8
    ),
    "forward_latency": lambda m, tmp: forward_latency(m, IDS, repeats=1),
    "generate": lambda m, tmp: generate(m, IDS, 2),
    "classify_logits": lambda m, tmp: classify_logits(m, IDS),
    "save_adapter": lambda m, tmp: save_adapter(m, tmp / "adapter", SOURCE),
    "base_fingerprint": lambda m, tmp: base_fingerprint(m),
}


@pytest.mark.parametrize("helper", OBSERVERS)
def test_a_helper_that_looks_at_a_model_leaves_it_exactly_as_it_was(helper, tmp_path):
    model = classifier()
    before = state_of(model)
    OBSERVERS[helper](model, tmp_path)
    after = state_of(model)
    assert after["modes"] == before["modes"]
    assert after["params"] == before["params"]
    for key, value in before["values"].items():
        assert torch.equal(after["values"][key], value), key


def test_evaluating_restores_the_modes_even_when_the_block_raises():
    model = classifier()
    before = state_of(model)["modes"]

    def fails_inside() -> None:
        with evaluating(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fails_inside()
    assert state_of(model)["modes"] == before


def test_train_classifier_trains_and_hands_back_the_callers_modes_and_flags():
    model = classifier()
    before = state_of(model)
    train_classifier(model, loader(), loader(), device=CPU, epochs=1, eval_every=1, progress=False)
    after = state_of(model)
    assert after["modes"] == before["modes"]
    assert after["params"] == before["params"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {k for k, v in before["values"].items() if not torch.equal(after["values"][k], v)}
    assert changed
    assert changed <= trained  # only what it trains


@pytest.fixture(scope="module")
def tiny_study():
    torch.manual_seed(0)
    base = studies.TinyTransformer().requires_grad_(False)
    return base, studies.make_splits(studies.RENAME_TASK, 16, n_val=8, n_test=8)


def test_train_run_hands_back_the_callers_modes(tiny_study):
    base, data = tiny_study
    model = studies.TinyTransformer()
    model.load_state_dict(base.state_dict())
    mixed_state(model, model.mlp)
    before = state_of(model)
    studies.train_run(model, data, label="all", steps=3, eval_every=1)
    assert state_of(model)["modes"] == before["modes"]
    assert state_of(model)["params"] == before["params"]


@pytest.mark.parametrize("run", ["lora_run", "full_finetune_run", "loss_and_accuracy"])
def test_study_helpers_leave_the_base_alone(tiny_study, run):
    base, data = tiny_study
    base = mixed_state(copy.deepcopy(base).requires_grad_(True), base.mlp)
    before = state_of(base)
    if run == "lora_run":
        studies.lora_run(base, data, 2, 4, steps=2)
    elif run == "full_finetune_run":
        studies.full_finetune_run(base, data, steps=2)
    else:
        studies.loss_and_accuracy(base, data.test)
    after = state_of(base)
    assert (after["modes"], after["params"]) == (before["modes"], before["params"])
    for key, value in before["values"].items():
        assert torch.equal(after["values"][key], value), key


def test_fit_regression_hands_back_the_callers_modes():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    mixed_state(model, model[1])
    before = state_of(model)
    x, y = torch.randn(10, 4), torch.randn(10, 2)
    toy_tasks.fit_regression(model, x, y, val=(x, y), steps=2)
    assert state_of(model)["modes"] == before["modes"]
    assert state_of(model)["params"] == before["params"]
