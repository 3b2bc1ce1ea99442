"""The training loop, the three modes, measurements, stops with advice, tables and results files."""

import copy
import dataclasses
import inspect
import json
from types import MappingProxyType, SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_gpt import SOURCE, TINY
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_helpers import protocol, train
from lora_helpers.data import Loaders
from lora_helpers.dora import replace_linear_with_dora
from lora_helpers.gpt2 import GPTModel, to_classifier
from lora_helpers.lora import count_parameters, replace_linear_with_lora
from lora_helpers.quant import add_lora_to_quantized, quantize_linears

CPU = torch.device("cpu")


def tiny_classifier(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return to_classifier(GPTModel(TINY), 2)


def marker_task(n: int, seed: int) -> TensorDataset:
    """Label 1 exactly when token 7 occurs in the sequence of 12 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, 12), generator=g)
    labels = torch.arange(n) % 2
    where = torch.randint(0, 12, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = 7
    return TensorDataset(ids, labels)


def tiny_loaders() -> Loaders:
    g = torch.Generator().manual_seed(0)
    train_set, val, test = marker_task(128, 1), marker_task(32, 2), marker_task(32, 3)
    return Loaders(
        DataLoader(train_set, batch_size=16, shuffle=True, generator=g),
        DataLoader(val, batch_size=16),
        DataLoader(test, batch_size=16),
        12,
    )


def test_pick_device_says_what_it_picked(capsys):
    assert train.pick_device("cpu") == CPU
    assert "Device: cpu" in capsys.readouterr().out


def test_modes_make_the_right_parameters_trainable():
    model = tiny_classifier()
    block = sum(p.numel() for p in model.trf_blocks[-1].parameters())
    norm_and_head = sum(
        p.numel() for p in (*model.final_norm.parameters(), *model.out_head.parameters())
    )
    total = count_parameters(model).total

    assert count_parameters(train.setup_mode(copy.deepcopy(model), "full")).trainable == total
    last = train.setup_mode(copy.deepcopy(model), "last-block")
    assert count_parameters(last).trainable == block + norm_and_head
    lora = train.setup_mode(copy.deepcopy(model), "lora", rank=2, alpha=2)
    # per block: Q, K, V, out 32->32 and the feed-forward 32->128->32, each 2 * (in + out); plus the head
    per_block = 4 * 2 * (32 + 32) + 2 * 2 * (32 + 128)
    assert count_parameters(lora).trainable == 2 * per_block + 32 * 2 + 2
    qv = train.setup_mode(
        copy.deepcopy(model), "lora", rank=2, alpha=2, targets=["W_query", "W_value"]
    )
    assert count_parameters(qv).trainable == 2 * 2 * 2 * (32 + 32) + 66
    with pytest.raises(ValueError, match="Unknown mode 'half'"):
        train.setup_mode(model, "half")


@pytest.mark.parametrize("mode", train.MODES)
def test_a_short_run_lowers_the_loss(mode):
    loaders = tiny_loaders()
    model = train.setup_mode(tiny_classifier(), mode, rank=4, alpha=8)
    before = train.evaluate(model, loaders.val, CPU)[0]
    lr = {"lora": 1e-2, "full": 3e-3, "last-block": 3e-3}[mode]
    history = train.train_classifier(
        model, loaders.train, loaders.val, device=CPU, epochs=6, lr=lr, eval_every=8, progress=False
    )
    after = train.evaluate(model, loaders.val, CPU)[0]
    assert after < 0.7 * before
    assert history.steps == [8, 16, 24, 32, 40, 48]
    assert history.epoch_steps == [8, 16, 24, 32, 40, 48]
    assert len(history.train_acc) == len(history.val_acc) == 6
    assert history.steps_done == 48
    assert history.seconds_per_epoch > 0


def test_the_training_curve_averages_the_batches_trained_since_the_last_evaluation():
    loaders = tiny_loaders()
    model = train.setup_mode(tiny_classifier(), "full")
    before = copy.deepcopy(model)
    history = train.train_classifier(
        model,
        loaders.train,
        loaders.val,
        device=CPU,
        epochs=1,
        lr=0.0,  # the weights stay put, so every batch's loss is the untrained model's
        weight_decay=0.0,
        eval_every=4,
        eval_batches=None,
        progress=False,
    )
    batches = [
        (train.evaluate(before, [batch], CPU), len(batch[1]))
        for batch in _batches_in_training_order(loaders.train)
    ]
    first = batches[:4]  # (loss, accuracy), rows of the batches up to the first evaluation
    rows = sum(n for _, n in first)
    assert history.train_loss[0] == pytest.approx(sum(loss * n for (loss, _), n in first) / rows)
    assert history.train_acc[0] == pytest.approx(sum(acc * n for (_, acc), n in first) / rows)
    assert history.val_loss[0] == pytest.approx(train.evaluate(before, loaders.val, CPU)[0])


def _batches_in_training_order(loader):
    """The batches train_classifier(seed=123) sees in its first epoch."""
    loader.generator.manual_seed(123)
    return list(loader)


@pytest.mark.parametrize("keep_best", [False, True])
def test_keep_best_ends_with_the_weights_of_the_lowest_validation_loss(monkeypatch, keep_best):
    losses = iter([0.5, 0.3, 0.4, 0.6])  # scripted: the best is the second evaluation
    weights_at = []

    def scripted_evaluate(model, loader, device, max_batches=None):
        weights_at.append([p.detach().clone() for p in model.parameters()])
        return next(losses), 0.5

    monkeypatch.setattr(train, "evaluate", scripted_evaluate)
    loaders = tiny_loaders()
    model = train.setup_mode(tiny_classifier(), "full")
    history = train.train_classifier(
        model,
        loaders.train,
        loaders.val,
        device=CPU,
        epochs=2,
        eval_every=4,
        keep_best=keep_best,
        progress=False,
    )
    assert history.steps == [4, 8, 12, 16]
    assert (history.best_step, history.best_val_loss) == (8, 0.3)
    assert history.kept_step == (8 if keep_best else 16)
    kept = weights_at[1 if keep_best else 3]
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), kept, strict=True))
    assert not all(
        torch.equal(p, w) for p, w in zip(model.parameters(), weights_at[2], strict=True)
    )


def test_best_step_needs_an_evaluation():
    with pytest.raises(ValueError, match="No evaluation yet"):
        _ = train.History().best_step


def test_every_run_on_a_loader_sees_the_same_batches():
    loaders, base = tiny_loaders(), train.setup_mode(tiny_classifier(), "lora", rank=2, alpha=2)
    next(iter(loaders.train))  # peeking at a batch must not change what training sees
    histories = [
        train.train_classifier(
            copy.deepcopy(base),
            loaders.train,
            loaders.val,
            device=CPU,
            epochs=1,
            eval_every=2,
            progress=False,
        )
        for _ in range(2)
    ]
    assert histories[0].train_loss == histories[1].train_loss


def test_max_steps_stops_mid_epoch():
    loaders = tiny_loaders()
    model = train.setup_mode(tiny_classifier(), "lora", rank=2, alpha=2)
    history = train.train_classifier(
        model,
        loaders.train,
        loaders.val,
        device=CPU,
        epochs=3,
        max_steps=5,
        eval_every=2,
        progress=False,
    )
    assert history.steps == [2, 4, 5]
    assert history.epoch_steps == [5]
    assert history.steps_done == 5


def test_a_nan_loss_stops_with_advice():
    loaders = tiny_loaders()
    model = train.setup_mode(tiny_classifier(), "full")
    with torch.no_grad():
        model.out_head.weight.fill_(float("nan"))
    with pytest.raises(
        train.TrainingStopped, match=r"loss became nan at step 1: lower the learning rate"
    ):
        train.train_classifier(model, loaders.train, loaders.val, device=CPU, progress=False)


def test_out_of_memory_stops_with_advice(monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "_train_step", out_of_memory)
    loaders = tiny_loaders()
    model = train.setup_mode(tiny_classifier(), "full")
    with pytest.raises(
        train.TrainingStopped, match=r"batch size 16: lower the batch size \(try 8\)"
    ):
        train.train_classifier(model, loaders.train, loaders.val, device=CPU, progress=False)


def test_training_needs_trainable_parameters():
    model = tiny_classifier().requires_grad_(False)
    loaders = tiny_loaders()
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train_classifier(model, loaders.train, loaders.val, device=CPU, progress=False)


def test_run_mode_measures_and_saves_what_each_mode_needs(tmp_path):
    base, loaders = tiny_classifier(), tiny_loaders()
    recipe = train.Recipe(epochs=1, rank=2, alpha=2, eval_every=4, eval_batches=1)
    results = [
        train.run_mode(
            base, mode, loaders, recipe, device=CPU, checkpoint_dir=tmp_path, source=SOURCE
        )
        for mode in train.MODES
    ]
    lora, full, last = results
    assert lora.peak_memory is None  # CPU: not measured, not invented
    assert (tmp_path / "lora" / "adapter.safetensors").is_file()
    assert full.checkpoint_bytes == (tmp_path / "full.safetensors").stat().st_size
    assert lora.checkpoint_bytes < last.checkpoint_bytes < full.checkpoint_bytes
    assert full.trainable == full.total == count_parameters(base).total
    assert set(lora.accuracy) == {"train", "val", "test"}
    assert all(p.device == CPU for r in results for p in r.model.parameters())
    assert not any(".lora." in name for name, _ in base.named_parameters())  # the base is untouched

    rows = [r.row() for r in results]
    table = train.results_table(rows)
    assert table.splitlines()[0].split(" | ")[0].strip() == "mode"
    assert f"{lora.trainable:,}" in table
    assert "n/a (CPU)" in train.results_table(rows, measured=True)
    json.dumps(rows)  # JSON-ready


def test_run_mode_measures_only_the_splits_asked_for(tmp_path):
    base, loaders = tiny_classifier(), tiny_loaders()
    recipe = train.Recipe(
        epochs=2, rank=2, alpha=2, eval_every=4, eval_batches=None, keep_best=True
    )
    result = train.run_mode(
        base,
        "lora",
        loaders,
        recipe,
        device=CPU,
        checkpoint_dir=str(tmp_path),  # a str works as well as a Path
        source=SOURCE,
        seed=5,
        splits=("val", "test"),
        progress=False,
    )
    assert (tmp_path / "lora" / "adapter.safetensors").is_file()
    assert set(result.accuracy) == {"val", "test"}
    assert (result.lr, result.seed, result.recipe) == (8e-4, 5, recipe)
    assert result.val_loss == result.history.best_val_loss
    assert result.test_error == pytest.approx(1 - result.test_accuracy)
    assert result.val_accuracy == train.evaluate(result.model, loaders.val, CPU)[1]
    row = result.row()
    assert (row["lr"], row["seed"]) == (8e-4, 5)
    table = train.results_table([row])
    assert table.splitlines()[-1].split(" | ")[-3].strip() == "-"  # train accuracy: not measured
    assert "acc" not in train.results_table([row], accuracy=False)
    with pytest.raises(ValueError, match=r"Unknown split\(s\) \['dev'\]"):
        train.run_mode(
            base,
            "lora",
            loaders,
            recipe,
            device=CPU,
            checkpoint_dir=tmp_path,
            source=SOURCE,
            splits=("dev",),
        )


def test_tune_mode_picks_the_learning_rate_on_validation_then_runs_every_seed(tmp_path, capsys):
    base, loaders = tiny_classifier(), tiny_loaders()
    recipe = train.Recipe(
        epochs=2,
        rank=2,
        alpha=2,
        eval_every=4,
        eval_batches=None,
        keep_best=True,
        lr_grid={"lora": (1e-4, 1e-2), "full": (1e-3,), "last-block": (1e-3,)},
        seeds=(0, 1),
    )
    assert recipe.grid("lora") == (1e-4, 1e-2)
    assert train.Recipe().grid("full") == (5e-5,)
    with pytest.raises(ValueError, match="no learning rate for 'half'"):
        recipe.grid("half")
    done = train.run_mode(
        base,
        "lora",
        loaders,
        dataclasses.replace(recipe, lr={**recipe.lr, "lora": 1e-2}),
        device=CPU,
        checkpoint_dir=tmp_path / "done",
        source=SOURCE,
        seed=0,
        progress=False,
    )
    tuned = train.tune_mode(
        base,
        "lora",
        loaders,
        recipe,
        device=CPU,
        checkpoint_dir=tmp_path,
        source=SOURCE,
        reuse=[done],
    )
    assert set(tuned.lr_scores) == {1e-4, 1e-2}
    assert tuned.lr == min(tuned.lr_scores, key=tuned.lr_scores.get)
    assert tuned.lr_scores[1e-2] == done.val_loss
    assert [(r.seed, r.lr) for r in tuned.runs] == [(0, tuned.lr), (1, tuned.lr)]
    assert all(set(r.accuracy) >= {"val", "test"} for r in tuned.runs)
    assert all(r.model is None for r in tuned.runs if r is not done)  # numbers kept, weights freed
    # Not reused: a run at the same lr and seed trained again gives the same numbers.
    again = train.tune_mode(
        base,
        "lora",
        loaders,
        dataclasses.replace(recipe, seeds=(0,)),
        device=CPU,
        checkpoint_dir=tmp_path,
        source=SOURCE,
    )
    assert again.lr_scores == pytest.approx(tuned.lr_scores)

    figure = train.plot_comparison([tuned, again])
    assert len(figure.axes[0].get_lines()) == 4  # a mean line and the scored steps per mode
    assert (
        "lr per mode picked on validation from (lora 0.0001, 0.01; full 0.001; last-block 0.001), seeds 0, 1; scored at the best validation step"
        in recipe.describe()
    )
    assert (
        "one learning rate per mode, seed(s) 123; scored at the last step"
        in train.FULL_RECIPE.describe()
    )


def test_grid_report_notes_a_pick_at_the_edge_and_the_table_shows_spreads_and_baselines():
    runs = [
        SimpleNamespace(val_loss=0.3, val_accuracy=0.8, test_accuracy=acc)
        for acc in (0.85, 0.9, 0.8)
    ]
    at_edge = protocol.Tuned("lora", 1e-3, {1e-4: 0.5, 1e-3: 0.3}, runs)
    inside = protocol.Tuned("full", 1e-3, {1e-4: 0.5, 1e-3: 0.3, 1e-2: 0.4}, runs)
    smallest = protocol.Tuned("qv", 1e-4, {1e-4: 0.2, 1e-3: 0.3}, runs)
    report = train.grid_report([at_edge, inside, smallest]).splitlines()
    assert report == [
        "lora: validation loss by learning rate  0.0001: 0.500  0.001: 0.300*  (the largest tried)",
        "full: validation loss by learning rate  0.0001: 0.500  0.001: 0.300*  0.01: 0.400",
        "qv: validation loss by learning rate  0.0001: 0.200*  0.001: 0.300  (the smallest tried)",
    ]
    table = train.accuracy_table([at_edge], {"length rule": {"val": 0.84, "test": 0.87}})
    header, _, lora, rule = table.splitlines()
    assert header.split() == ["method", "lr", "seeds", "val", "acc", "%", "test", "acc", "%"]
    assert lora.split() == ["lora", "0.001", "3", "80", "(80-80)", "85", "(80-90)"]
    assert rule.split() == ["length", "rule", "-", "-", "84.0", "87.0"]


def test_choose_recipe_is_quick_without_cuda_and_says_so(capsys):
    recipe = train.choose_recipe(CPU)
    out = capsys.readouterr().out
    assert recipe.quick
    assert out.startswith("QUICK MODE (no CUDA GPU, running on cpu)")
    assert "The full recipe (on a CUDA GPU) is: 5 epoch(s), batch 8, all rows" in out
    assert train.choose_recipe(CPU, full=True) == train.FULL_RECIPE


def test_save_results_writes_json_and_png(tmp_path):
    base, loaders = tiny_classifier(), tiny_loaders()
    recipe = train.Recipe(epochs=1, rank=2, alpha=2, eval_every=4, eval_batches=1)
    result = train.run_mode(
        base, "lora", loaders, recipe, device=CPU, checkpoint_dir=tmp_path, source=SOURCE
    )
    figure = train.plot_history(result.history, "lora")
    json_path, png_path = train.save_results(
        [result], str(tmp_path / "results"), "05_finetune_cpu", {"device": "cpu"}, figure
    )
    for args, message in (
        (("a/b", {}, figure), "file name without folders"),
        (("c", {"runs": 1}, figure), '"runs" key'),
        (("d", {"device": CPU}, figure), "JSON cannot write"),
        (("e", {}, None), "matplotlib Figure"),
    ):
        with pytest.raises(ValueError, match=message):
            train.save_results([result], tmp_path / "refused", *args)
    assert not (tmp_path / "refused").exists()
    saved = json.loads(json_path.read_text())
    assert saved["device"] == "cpu"
    assert saved["runs"][0]["trainable_params"] == result.trainable
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "05_finetune_cpu.json",
        "05_finetune_cpu.png",
    ]


def test_classify_texts_pads_like_training_and_names_labels(gpt2_tokenizer):
    torch.manual_seed(0)
    model = to_classifier(GPTModel({**TINY, "vocab_size": 50257}), 2)
    texts = ["Call now to claim your prize!", "See you at lunch"]
    predictions = train.classify_texts(model, texts, gpt2_tokenizer, max_length=12)
    assert [label for label, _ in predictions] == [
        ("ham", "spam")[int(i)] for i in _argmax_at_position(model, texts, 12, gpt2_tokenizer)
    ]
    assert all(0.5 <= p <= 1 for _, p in predictions)


def _argmax_at_position(model, texts, length, tokenizer):
    from lora_helpers.data import encode

    with torch.no_grad():
        return model(encode(texts, tokenizer, length))[:, -1].argmax(-1)


def test_device_slug_is_file_name_safe():
    assert train.device_slug(CPU) == "cpu"


# --------------------------------------------------------------- mixed precision on GPUs


@pytest.mark.parametrize(
    ("native_bf16", "expected"),
    [(True, torch.bfloat16), (False, torch.float16)],  # Ampere and newer; T4 / V100
)
def test_autocast_uses_bf16_only_where_the_gpu_computes_it(monkeypatch, native_bf16, expected):
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native_bf16  # emulation counts as support by default

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert train.autocast_dtype(torch.device("cuda")) == expected
    assert train.autocast_dtype(torch.device("cpu")) is None
    assert train.autocast_dtype(torch.device("mps")) is None


class RecordingScaler:
    """GradScaler's interface, recording the order of calls and the gradient at clipping."""

    def __init__(self, params):
        self.calls, self.params = [], params

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 1024.0

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        for p in self.params:
            p.grad /= 1024.0

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_a_train_step_unscales_before_clipping_and_steps_through_the_scaler():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    scaler = RecordingScaler(params)

    class LastPosition(nn.Module):  # classify_logits reads the last position
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.linear(ids.float()).unsqueeze(1)

    ids, labels = torch.randn(3, 4), torch.tensor([0, 1, 0])
    nn.functional.cross_entropy(reference(ids), labels).backward()  # the true gradient
    optimizer = torch.optim.SGD(params, lr=0.1)
    train._train_step(
        LastPosition(model), optimizer, scaler, params, ids, labels, torch.device("cpu"), 1e9
    )
    assert scaler.calls == ["scale", "unscale_", "step", "update"]
    for p, r in zip(params, reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad)  # unscaled before clipping and stepping
        torch.testing.assert_close(p.detach(), r.detach() - 0.1 * r.grad)


def test_the_full_recipe_is_the_references_without_dropout_or_clipping():
    """Raschka's ch. 6 and appendix E fine-tune with drop_rate 0.0 and no gradient clipping."""
    full, quick = train.FULL_RECIPE, train.QUICK_RECIPE
    assert (full.drop_rate, full.grad_clip) == (0.0, None)
    assert (quick.drop_rate, quick.grad_clip) == (full.drop_rate, full.grad_clip)
    assert "weight decay 0.1, dropout 0, no gradient clipping;" in full.describe()
    clipped = dataclasses.replace(full, drop_rate=0.1, grad_clip=1.0)
    assert "dropout 0.1, gradients clipped to norm 1;" in clipped.describe()


def test_run_mode_fine_tunes_with_the_recipes_dropout_and_leaves_the_base_as_it_was(tmp_path):
    torch.manual_seed(0)
    base, loaders = to_classifier(GPTModel({**TINY, "drop_rate": 0.1}), 2), tiny_loaders()
    recipe = train.Recipe(epochs=1, rank=2, alpha=2, eval_every=4, eval_batches=1)
    result = train.run_mode(
        base, "full", loaders, recipe, device=CPU, checkpoint_dir=tmp_path, source=SOURCE
    )
    probabilities = {m.p for m in result.model.modules() if isinstance(m, nn.Dropout)}
    assert probabilities == {0.0}
    assert {b.att.dropout for b in result.model.trf_blocks} == {0.0}
    assert base.drop_emb.p == base.trf_blocks[0].att.dropout == 0.1  # run_mode trains a copy


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"drop_rate": 1.0},
            r"drop_rate \(a dropout probability\) must be a number in \[0, 1\), got 1.0",
        ),
        ({"drop_rate": -0.1}, r"got -0.1"),
        ({"grad_clip": 0.0}, r"grad_clip is the largest gradient norm, a finite number > 0, or"),
        ({"grad_clip": -1.0}, r"got -1.0"),
        ({"grad_clip": float("inf")}, r"got inf"),
        ({"epochs": 0}, r"epochs must be a positive integer, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be a positive integer, got 2.5"),
        ({"eval_every": True}, r"eval_every must be a positive integer, got True"),
        ({"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0, got nan"),
        ({"lr": {"lora": 0.0}}, r"finite numbers > 0; 'lora' has \[0.0\]"),
        ({"lr_grid": {"full": (1e-3, float("inf"))}}, r"'full' has \[0.001, inf\]"),
        ({"lr_grid": {"full": ()}}, r"'full' has \[\]"),
        ({"seeds": ()}, r"seeds is empty"),
        (
            {"eval_batches": 0},
            r"eval_batches must be a positive integer, got 0; or None, for no limit",
        ),
        ({"max_length": 0}, r"max_length must be a positive integer, got 0; or None"),
        ({"sizes": (10,)}, r"sizes must be None or \(train, val, test\) rows"),
        ({"targets": "W_query"}, r"write \('W_query',\)"),
        ({"rank": 0}, r"rank must be a positive integer, got 0"),
        ({"alpha": 0}, r"alpha is 0"),
    ],
)
def test_a_recipe_that_cannot_train_is_refused_when_made(setting, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(train.QUICK_RECIPE, **setting)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"checkpoint_dir": "FILE"}, r"is a file, not a folder"),
        ({"checkpoint_dir": "FILE/inside"}, r"cannot be written: .* is not a folder"),
        (
            {"mode": "full", "recipe": train.Recipe(lr={"lora": 1e-3})},
            r"no learning rate for 'full'",
        ),
        ({"splits": "test"}, r"splits must be a list of names, got the string 'test'"),
        ({"seed": "1"}, r"seed must be an integer, got '1'"),
    ],
)
def test_run_mode_refuses_what_would_fail_after_training_before_it_trains(
    tmp_path, monkeypatch, change, message
):
    (tmp_path / "FILE").write_text("")
    monkeypatch.setattr(train, "train_classifier", lambda *a, **k: pytest.fail("it trained"))
    kwargs = {
        "mode": "lora",
        "recipe": train.Recipe(epochs=1, rank=2, alpha=2),
        "checkpoint_dir": tmp_path / "checkpoints",
        "device": CPU,
        "source": SOURCE,
    } | change
    if isinstance(kwargs["checkpoint_dir"], str):
        kwargs["checkpoint_dir"] = tmp_path / kwargs["checkpoint_dir"]
    mode, recipe = kwargs.pop("mode"), kwargs.pop("recipe")
    with pytest.raises(ValueError, match=message):
        train.run_mode(tiny_classifier(), mode, tiny_loaders(), recipe, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_train_classifier_refuses_a_clipping_norm_that_would_flip_gradients():
    model, loaders = tiny_classifier(), tiny_loaders()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="a finite number > 0, or None for no clipping; got -1"):
        train.train_classifier(
            model, loaders.train, loaders.val, device=CPU, grad_clip=-1, progress=False
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_run_mode_clips_gradients_only_as_the_recipe_says(monkeypatch, tmp_path, grad_clip):
    """The reference does not clip (FULL_RECIPE.grad_clip is None), and neither does run_mode
    then; with grad_clip set, every step clips to that norm."""
    assert inspect.signature(train.train_classifier).parameters["grad_clip"].default is None
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda p, n, **kw: norms.append(n) or clip(p, n, **kw)
    )
    recipe = train.Recipe(
        epochs=1, rank=2, alpha=2, eval_every=4, eval_batches=1, grad_clip=grad_clip
    )
    result = train.run_mode(
        tiny_classifier(),
        "lora",
        tiny_loaders(),
        recipe,
        device=CPU,
        checkpoint_dir=tmp_path,
        source=SOURCE,
    )
    steps = result.history.steps_done
    assert steps > 0
    assert norms == ([] if grad_clip is None else [grad_clip] * steps)


def test_pick_device_refuses_a_device_this_machine_lacks(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    fix = r"leave the argument out to use the best device there is, or pass 'cpu'\."
    for asked, problem in (
        ("cuda", "No CUDA device here"),
        ("mps", "No Apple MPS device here"),
        ("gpu", "Unknown device 'gpu'"),
        ("meta", "Unknown device 'meta'"),
    ):
        with pytest.raises(ValueError, match=f"^{problem}; {fix}$"):
            train.pick_device(asked)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"No CUDA device 'cuda:1' \(this machine has 1\) here"):
        train.pick_device("cuda:1")
    assert capsys.readouterr().out == ""  # no "Device: ... (as asked)" for a device not there


def test_a_device_given_as_a_string_works(tmp_path, capsys):
    model, loaders = tiny_classifier(), tiny_loaders()
    assert train.choose_recipe("cpu") is train.QUICK_RECIPE
    assert (train.autocast_dtype("cpu"), train.device_slug("cpu")) == (None, "cpu")
    assert train.evaluate(model, loaders.val, "cpu") == train.evaluate(model, loaders.val, CPU)
    recipe = train.Recipe(epochs=1, rank=2, alpha=2, eval_every=4, eval_batches=1)
    result = train.run_mode(
        model,
        "lora",
        loaders,
        recipe,
        device="cpu",
        checkpoint_dir=tmp_path,
        source=SOURCE,
        splits=("val",),
        progress=False,
    )
    assert result.row()["device"] == "cpu"


def test_results_table_says_why_a_run_has_no_peak_memory():
    row = {"mode": "lora", "seconds_per_epoch": 1.0, "peak_memory_bytes": None}
    cells = [
        train.results_table([{**row, **device}], measured=True)
        .splitlines()[-1]
        .split(" | ")[-1]
        .strip()
        for device in ({"device": "cpu"}, {"device": "mps"}, {"device": "cuda"}, {})
    ]
    assert cells == [
        "n/a (CPU)",
        "n/a (MPS: measured on CUDA only)",
        "n/a (CUDA: not measured)",
        "n/a",
    ]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr": 0.001}, r"lr is a learning rate per mode, a dict such as \{'lora': 8e-4"),
        ({"lr_grid": (1e-4, 2e-4)}, r"lr_grid is the learning rates to try per mode"),
        ({"lr_grid": {"lora": 1e-4}}, r"a dict of tuples such as \{'lora': \(2e-4, 8e-4\)\}"),
        ({"seeds": 3}, r"seeds is a tuple of integers such as \(0, 1, 2\); got 3\."),
    ],
)
def test_a_recipe_setting_of_the_wrong_kind_is_refused_with_its_form(setting, message):
    with pytest.raises(TypeError, match=message):
        train.Recipe(**setting)
    with pytest.raises(ValueError, match=r"sizes must be None or \(train, val, test\) rows"):
        train.Recipe(sizes=300)


@pytest.mark.parametrize(
    ("setting", "same"),
    [
        ({"seeds": range(3)}, {"seeds": (0, 1, 2)}),
        ({"lr": MappingProxyType({"lora": 1e-4})}, {"lr": {"lora": 1e-4}}),
        ({"lr_grid": {"lora": np.array([1e-4, 8e-4])}}, {"lr_grid": {"lora": (1e-4, 8e-4)}}),
        ({"lr_grid": MappingProxyType({"lora": range(1, 3)})}, {"lr_grid": {"lora": (1, 2)}}),
    ],
)
def test_a_recipe_takes_any_mapping_and_any_iterable_and_stores_dicts_and_tuples(setting, same):
    recipe = train.Recipe(**setting)
    assert recipe == train.Recipe(**same)
    assert type(recipe.lr) is dict
    assert type(recipe.seeds) is tuple
    assert recipe.lr_grid is None or type(recipe.lr_grid["lora"]) is tuple
    assert json.dumps(dataclasses.asdict(recipe)) == json.dumps(
        dataclasses.asdict(train.Recipe(**same))
    )
    assert recipe.describe() == train.Recipe(**same).describe()


def test_a_recipe_that_worked_before_is_stored_as_given():
    lr = {"lora": 1e-4}
    recipe = train.Recipe(lr=lr, lr_grid={"lora": [1e-4, 2e-4]}, seeds=[0, 1])
    assert (recipe.lr, recipe.lr_grid, recipe.seeds) == (lr, {"lora": [1e-4, 2e-4]}, [0, 1])
    assert recipe == train.Recipe(lr={"lora": 1e-4}, lr_grid={"lora": [1e-4, 2e-4]}, seeds=[0, 1])
    assert json.loads(json.dumps(dataclasses.asdict(recipe)))["seeds"] == [0, 1]


def test_a_head_with_more_outputs_than_the_classes_trains(tmp_path):
    torch.manual_seed(0)
    model, loaders = to_classifier(GPTModel(TINY), 3), tiny_loaders()  # labels only 0 and 1
    history = train.train_classifier(
        model, loaders.train, loaders.val, device=CPU, epochs=1, progress=False
    )
    assert history.train_loss


def test_training_refuses_a_head_with_fewer_outputs_than_classes_or_a_wrapped_lm_head():
    loaders = tiny_loaders()
    torch.manual_seed(0)
    small = to_classifier(GPTModel(TINY), 1)
    with pytest.raises(ValueError, match=r"head has 1 outputs but the labels have 2 classes"):
        train._check_head(small, loaders.train)
    lm = replace_linear_with_lora(GPTModel(TINY), 2, 2, ["out_head"])
    assert not hasattr(lm.out_head, "out_features")  # a LinearWithLoRA
    with pytest.raises(ValueError, match=r"head has 64 outputs but the labels have 2 classes"):
        train._check_head(lm, loaders.train)
    quantised = add_lora_to_quantized(quantize_linears(GPTModel(TINY), block_size=32), 2, 2)
    with pytest.raises(ValueError, match=r"head has 64 outputs but the labels have 2 classes"):
        train._check_head(quantised, loaders.train)
    dora = replace_linear_with_dora(to_classifier(GPTModel(TINY), 2), 2, 2, ["out_head"])
    train._check_head(dora, loaders.train)  # a wrapped classifier head passes


def test_training_refuses_a_model_still_carrying_its_language_model_head(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lm, loaders = GPTModel(TINY), tiny_loaders()  # to_classifier forgotten: 64 outputs
    message = (
        r"head has 64 outputs but the labels have 2 classes; call gpt2\.to_classifier\(model, 2\)"
    )
    before = [p.detach().clone() for p in lm.parameters()]
    with pytest.raises(ValueError, match=message):
        train.train_classifier(lm, loaders.train, loaders.val, device=CPU, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters(), strict=True))
    monkeypatch.setattr(copy, "deepcopy", lambda *a: pytest.fail("it copied the base"))
    with pytest.raises(ValueError, match=message):
        train.run_mode(
            lm,
            "lora",
            loaders,
            train.Recipe(rank=2, alpha=2),
            device=CPU,
            checkpoint_dir=tmp_path / "checkpoints",
            source=SOURCE,
        )
    assert list(tmp_path.iterdir()) == []
