"""Fine-tuning a GPT classifier: device choice, the three set-ups, one training loop, measurements.

Modes (set up by `setup_mode`):
- "lora": everything frozen, LoRA (rank, alpha) on the target nn.Linear layers.
- "full": every parameter trainable.
- "last-block": the last transformer block, the final norm and the head trainable.

`run_mode` trains one mode on a copy of a base model and measures what the LoRA
articles claim: trainable parameters, peak accelerator memory, time per epoch,
checkpoint size on disk, and accuracy. `tune_mode` runs one mode under the series'
protocol (lora_helpers.protocol): learning rate picked on validation data, several seeds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import numbers
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import protocol
from .adapters import save_adapter
from .assets import checkout, data_dir, writable_folder, write_atomically
from .checks import dropout_probability, is_positive_int, is_positive_number, positive_int
from .data import LABELS, Loaders, encode
from .gpt2 import GPT2Source, classify_logits, set_dropout
from .lora import (
    check_rank_alpha,
    count_parameters,
    evaluating,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
    restored_modes,
)

if TYPE_CHECKING:
    from tiktoken import Encoding

MODES = ("lora", "full", "last-block")


class TrainingStopped(RuntimeError):
    """Training stopped early for a reason the message explains (NaN loss, out of memory)."""


def best_device(prefer: str | torch.device | None = None) -> torch.device:
    """`prefer` ("cpu", "cuda", "cuda:1", "mps"), checked, or else the first of CUDA, Apple's
    MPS and the CPU that this machine has. Raises ValueError for another kind of device or
    one this machine lacks."""
    if prefer is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    fix = "leave the argument out to use the best device there is, or pass 'cpu'"
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unknown device {prefer!r}; {fix}.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        have = torch.cuda.device_count()
        which = f" {str(device)!r} (this machine has {have})" if have else ""
        raise ValueError(f"No CUDA device{which} here; {fix}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"No Apple MPS device here; {fix}.")
    return device


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """best_device(prefer), printing the choice and why; raises best_device's ValueError."""
    device = best_device(prefer)
    if prefer is not None:
        why = "as asked"
    elif device.type == "cuda":
        why = torch.cuda.get_device_name(0)
    elif device.type == "mps":
        why = "Apple GPU"
    else:
        why = "no CUDA or MPS GPU found"
    print(f"Device: {device.type} ({why})")
    return device


def device_slug(device: torch.device | str) -> str:
    """A file-name-safe device name: "nvidia-h100-80gb-hbm3", "mps", "cpu"."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)


def setup_mode(
    model: nn.Module,
    mode: str,
    *,
    rank: int = 16,
    alpha: float = 16,
    targets: Iterable[str] | None = None,
    rslora: bool = False,
) -> nn.Module:
    """Set which parameters train, in place; returns `model` (a GPTModel with its classifier head).

    LoRA goes on the nn.Linear layers of the transformer blocks (`targets`: names as for
    replace_linear_with_lora; None = all of them); the new classifier head trains in full.
    """
    if mode == "full":
        return model.requires_grad_(True)
    if mode == "last-block":
        model.requires_grad_(False)
        for part in (model.trf_blocks[-1], model.final_norm, model.out_head):
            part.requires_grad_(True)
        return model
    if mode == "lora":
        replace_linear_with_lora(model.trf_blocks, rank, alpha, targets, rslora=rslora)
        mark_only_lora_as_trainable(model)
        model.out_head.requires_grad_(True)
        return model
    raise ValueError(f"Unknown mode {mode!r}; use one of {MODES}.")


@dataclass
class History:
    """What one training run saw at each evaluation: the mean loss and accuracy of the
    training batches since the previous evaluation, the loss and accuracy on the validation
    split; and where the epochs ended."""

    steps: list[int] = field(default_factory=list)  # optimizer step of each evaluation
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)  # step at the end of each epoch
    steps_done: int = 0
    steps_per_epoch: int = 0
    train_seconds: float = 0.0  # optimizer steps only, evaluations excluded
    kept_step: int = 0  # the step whose weights the model ends with (best or last)

    @property
    def seconds_per_epoch(self) -> float:
        """Training time scaled to one full pass over the training loader."""
        return self.train_seconds * self.steps_per_epoch / max(self.steps_done, 1)

    @property
    def best_val_loss(self) -> float:
        """The lowest validation loss of any evaluation (inf before the first one)."""
        return min(self.val_loss, default=math.inf)

    @property
    def best_step(self) -> int:
        """The step of the evaluation with the lowest validation loss (the earliest, on ties)."""
        if not self.val_loss:
            raise ValueError("No evaluation yet: train for at least one step first.")
        return self.steps[self.val_loss.index(self.best_val_loss)]


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype for training on `device`: None means plain float32.

    bf16 on CUDA GPUs that compute it natively (Ampere and newer); fp16, with a gradient
    scaler, on older ones such as the T4 and V100 of free Colab, where
    torch.cuda.is_bf16_supported() alone is True but bf16 is only emulated, and slow.
    None on CPU and MPS.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float16


def _autocast(device: torch.device):
    """Autocast to autocast_dtype(device), or a no-op context where that is None."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    max_batches: int | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over `loader`, or its first `max_batches` batches.

    Measured in eval mode; the model's modes are restored afterwards.
    """
    device = torch.device(device)
    total_loss, correct, seen = 0.0, 0, 0
    with evaluating(model):
        for i, (ids, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            ids, labels = ids.to(device), labels.to(device)
            with _autocast(device):
                logits = classify_logits(model, ids).float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
    if seen == 0:
        raise ValueError("The loader is empty; there is nothing to evaluate.")
    return total_loss / seen, correct / seen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train_classifier(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    device: torch.device | str,
    epochs: int = 5,
    lr: float = 8e-4,
    weight_decay: float = 0.1,
    max_steps: int | None = None,
    eval_every: int = 50,
    eval_batches: int | None = 5,
    keep_best: bool = False,
    grad_clip: float | None = None,
    seed: int = 123,
    progress: bool = True,
) -> History:
    """Train `model` (on `device`) with AdamW on the last-token cross-entropy; returns its History.

    Batches are (ids (batch, tokens), labels (batch,)). Every `eval_every` steps (and at the
    end) History records the mean loss and accuracy of the training batches since the last
    evaluation and the loss and accuracy on `eval_batches` validation batches (None: all).
    keep_best=True (early stopping) ends with the weights of the evaluation with the lowest
    validation loss instead of the last ones. The model ends on `device`, each submodule in
    the train/eval mode it had before. grad_clip: the largest gradient norm, clipped to
    before each step (None: no clipping, as the reference).
    A NaN loss or running out of memory stops with a TrainingStopped that says what to change.
    Raises ValueError, before training, for a model without trainable parameters or whose
    out_head has fewer outputs than the labels have classes or is still the language-model
    head (forgotten to_classifier), and for bad settings.
    """
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters; call setup_mode(model, mode) first."
        )
    if epochs < 1 or len(train_loader) == 0:
        raise ValueError("Need epochs >= 1 and a non-empty training loader.")
    _check_head(model, train_loader)
    _check_grad_clip(grad_clip)
    seed_everything(seed)
    if train_loader.generator is not None:  # the same batches in the same order on every run
        train_loader.generator.manual_seed(seed)
    with restored_modes(model):  # trains in train mode; the caller's modes come back
        model.to(device).train()
        optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters (CUDA, CPU)
            params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu")
        )
        history = History(steps_per_epoch=len(train_loader))
        fp16 = autocast_dtype(device) == torch.float16
        scaler = torch.amp.GradScaler("cuda" if fp16 else "cpu", enabled=fp16)
        best = protocol.BestStep(params) if keep_best else None
        seen_loss, seen_correct, seen = 0.0, 0, 0  # training batches since the last evaluation
        total = (
            epochs * len(train_loader)
            if max_steps is None
            else min(max_steps, epochs * len(train_loader))
        )
        bar = tqdm(total=total, desc="training", unit="step", disable=not progress)
        step = 0
        try:
            for _ in range(epochs):
                _sync(device)
                started = time.perf_counter()
                for ids, labels in train_loader:
                    if step == total:
                        break
                    loss, correct = _train_step(
                        model, optimizer, scaler, params, ids, labels, device, grad_clip
                    )
                    if not math.isfinite(loss):
                        raise TrainingStopped(
                            f"The loss became {loss} at step {step + 1}: lower the learning rate "
                            f"(it is {lr:g}; try {lr / 10:g}) or clip gradients (grad_clip=1.0)."
                        )
                    step += 1
                    seen_loss, seen_correct, seen = (
                        seen_loss + loss * len(labels),
                        seen_correct + correct,
                        seen + len(labels),
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if step % eval_every == 0 or step == total:
                        _sync(device)
                        history.train_seconds += time.perf_counter() - started
                        history.steps.append(step)
                        history.train_loss.append(seen_loss / seen)
                        history.train_acc.append(seen_correct / seen)
                        seen_loss, seen_correct, seen = 0.0, 0, 0
                        val_loss, val_acc = evaluate(model, val_loader, device, eval_batches)
                        if best is not None:
                            best.offer(step, val_loss)
                        history.val_loss.append(val_loss)
                        history.val_acc.append(val_acc)
                        started = time.perf_counter()
                _sync(device)
                history.train_seconds += time.perf_counter() - started
                history.steps_done = step
                history.epoch_steps.append(step)
                if step == total:
                    break
        except TrainingStopped:
            raise
        except torch.cuda.OutOfMemoryError:
            raise _out_of_memory(device, train_loader) from None
        except RuntimeError as error:  # MPS reports running out of memory as a RuntimeError
            if "out of memory" not in str(error).lower():
                raise
            raise _out_of_memory(device, train_loader) from None
        finally:
            bar.close()
        history.kept_step = step
        if best is not None and best.state is not None:
            best.restore()
            history.kept_step = best.step
        return history


def _check_head(model: nn.Module, loader: DataLoader) -> None:
    """Raise ValueError if model.out_head has fewer outputs than `loader`'s labels have
    classes, or exactly the vocabulary's (model.tok_emb) number: the language-model head still
    in place, which would train without complaint and classify nothing.

    The classes are the SMS task's two (data.LABELS), or 0 to the largest label if that is
    more. A head wrapped by LoRA, DoRA or quantisation is read through its wrapped layer. A
    model without an out_head.out_features, or a loader over a dataset without a length, is
    not checked.
    """
    head = getattr(model, "out_head", None)
    head = getattr(head, "linear", getattr(head, "base", head))  # LoRA/DoRA; quantised LoRA
    outputs = getattr(head, "out_features", None)
    dataset = loader.dataset
    if outputs is None or not hasattr(dataset, "__len__"):
        return
    labels = [int(dataset[i][1]) for i in range(len(dataset))]
    classes = max(len(LABELS), max(labels, default=0) + 1)
    vocab = getattr(getattr(model, "tok_emb", None), "num_embeddings", None)
    if outputs < classes or outputs == vocab:
        raise ValueError(
            f"The model's head has {outputs} outputs but the labels have {classes} classes; "
            f"call gpt2.to_classifier(model, {classes}) first."
        )


def _train_step(
    model, optimizer, scaler, params, ids, labels, device, grad_clip
) -> tuple[float, int]:
    """One optimizer step on a batch; returns its (mean loss, number of correct predictions).

    With fp16 autocast the scaler scales the loss up before backward (fp16 gradients would
    underflow) and the gradients back down before clipping; elsewhere it does nothing.
    """
    ids, labels = ids.to(device), labels.to(device)
    with _autocast(device):
        logits = classify_logits(model, ids).float()
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), int((logits.argmax(-1) == labels).sum())


def _check_grad_clip(grad_clip: float | None) -> None:
    if grad_clip is not None and not is_positive_number(grad_clip):
        raise ValueError(
            f"grad_clip is the largest gradient norm, a finite number > 0, or None for no "
            f"clipping; got {grad_clip!r}."
        )


def _out_of_memory(device: torch.device, loader: DataLoader) -> TrainingStopped:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    size = loader.batch_size or 1
    return TrainingStopped(
        f"Out of {device.type} memory at batch size {size}: lower the batch size "
        f"(try {max(size // 2, 1)}), shorten max_length, or use LoRA instead of full fine-tuning."
    )


def _is_sequence(value: object) -> bool:
    """True for an iterable other than a str (a tuple, list, range, array...)."""
    return isinstance(value, Iterable) and not isinstance(value, str | bytes)


def _as_sequence(value: Iterable) -> tuple | list:
    """`value` itself if a tuple or list, else tuple(value)."""
    return value if isinstance(value, tuple | list) else tuple(value)


@dataclass(frozen=True)
class Recipe:
    """Training settings. The defaults are the reference's full LoRA recipe."""

    epochs: int = 5
    batch_size: int = 8
    lr: dict[str, float] = field(
        default_factory=lambda: {"lora": 8e-4, "full": 5e-5, "last-block": 5e-5}
    )
    weight_decay: float = 0.1
    drop_rate: float = 0.0  # dropout while fine-tuning: the reference's 0.0 (GPT-2 configs: 0.1)
    grad_clip: float | None = None  # clip gradients to this norm; the reference does not clip
    rank: int = 16
    alpha: float = 16
    targets: tuple[str, ...] | None = None  # LoRA targets; None: every linear of the blocks
    max_length: int | None = None  # None: the longest training message
    sizes: tuple[int, int, int] | None = None  # (train, val, test) rows; None: all
    eval_every: int = 50
    eval_batches: int | None = 5  # validation batches per evaluation; None: all
    quick: bool = False
    # The protocol (lora_helpers.protocol) that tune_mode follows:
    lr_grid: dict[str, tuple[float, ...]] | None = None  # tried per mode; None: `lr` only
    seeds: tuple[int, ...] = (123,)
    keep_best: bool = False  # score each run at its best validation step (early stopping)

    def __post_init__(self) -> None:
        """Refuse settings that cannot train, each with one sentence naming it (ValueError;
        TypeError for an lr or lr_grid that is not a mapping, or seeds or an lr_grid entry
        that is not a sequence). Any mapping is stored as a dict, and any other iterable than
        a tuple or list as a tuple."""
        for name in ("epochs", "batch_size", "eval_every"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.lr, Mapping):
            raise TypeError(
                "lr is a learning rate per mode, a dict such as {'lora': 8e-4, 'full': 5e-5, "
                f"'last-block': 5e-5}}; got {self.lr!r}."
            )
        if self.lr_grid is not None and not (
            isinstance(self.lr_grid, Mapping) and all(map(_is_sequence, self.lr_grid.values()))
        ):
            raise TypeError(
                "lr_grid is the learning rates to try per mode, a dict of tuples such as "
                f"{{'lora': (2e-4, 8e-4)}}, or None; got {self.lr_grid!r}."
            )
        if not _is_sequence(self.seeds):
            raise TypeError(f"seeds is a tuple of integers such as (0, 1, 2); got {self.seeds!r}.")
        # Stored as the rest of the code reads them: dicts, and a tuple unless a tuple or list.
        object.__setattr__(self, "lr", dict(self.lr))
        object.__setattr__(self, "seeds", _as_sequence(self.seeds))
        if self.lr_grid is not None:
            grid = {mode: _as_sequence(lrs) for mode, lrs in self.lr_grid.items()}
            object.__setattr__(self, "lr_grid", grid)
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, numbers.Real) or not 0 <= wd < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}.")
        grids = {} if self.lr_grid is None else self.lr_grid
        for mode, lrs in [*((m, (lr,)) for m, lr in self.lr.items()), *grids.items()]:
            bad = [lr for lr in lrs if not is_positive_number(lr)]
            if bad or not lrs:
                raise ValueError(
                    f"Learning rates must be finite numbers > 0; {mode!r} has {list(lrs)!r}."
                )
        for name in ("eval_batches", "max_length"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name), "or None, for no limit")
        if self.sizes is not None and (
            not isinstance(self.sizes, tuple | list)
            or len(self.sizes) != 3
            or not all(is_positive_int(n) for n in self.sizes)
        ):
            raise ValueError(
                f"sizes must be None or (train, val, test) rows, three positive integers; got "
                f"{self.sizes!r}."
            )
        if isinstance(self.targets, str):
            raise ValueError(
                f"targets must be a tuple of layer names, got the string {self.targets!r}; "
                f"write ({self.targets!r},)."
            )
        check_rank_alpha(self.rank, self.alpha)
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one (three or more show the spread).")
        _check_grad_clip(self.grad_clip)
        dropout_probability(self.drop_rate, "drop_rate (a dropout probability)")

    def grid(self, mode: str) -> tuple[float, ...]:
        """The learning rates tune_mode tries for `mode`: lr_grid[mode], or just lr[mode]."""
        if mode not in self.lr:
            raise ValueError(f"The recipe has no learning rate for {mode!r}; use one of {MODES}.")
        if self.lr_grid is not None and mode not in self.lr_grid:
            raise ValueError(f"lr_grid has no learning rates for {mode!r}; add {mode!r}: (...).")
        return (self.lr[mode],) if self.lr_grid is None else tuple(self.lr_grid[mode])

    def describe(self) -> str:
        rows = (
            "all rows"
            if self.sizes is None
            else "{:,} train / {:,} val / {:,} test rows".format(*self.sizes)
        )
        tokens = (
            "the longest training message"
            if self.max_length is None
            else f"at most {self.max_length} tokens"
        )
        lrs = ", ".join(f"{m} {lr:g}" for m, lr in self.lr.items())
        where = "" if self.targets is None else f" on {', '.join(self.targets)}"
        seeds = ", ".join(map(str, self.seeds))
        if self.lr_grid is None:
            runs = f"one learning rate per mode, seed(s) {seeds}"
        else:
            grids = "; ".join(
                f"{m} {', '.join(f'{lr:g}' for lr in lrs)}" for m, lrs in self.lr_grid.items()
            )
            runs = f"lr per mode picked on validation from ({grids}), seeds {seeds}"
        scored = "best validation step" if self.keep_best else "last step"
        clip = (
            "no gradient clipping"
            if self.grad_clip is None
            else f"gradients clipped to norm {self.grad_clip:g}"
        )
        return (
            f"{self.epochs} epoch(s), batch {self.batch_size}, {rows}, padded to {tokens}; "
            f"LoRA r={self.rank}, alpha={self.alpha:g}{where}; AdamW lr ({lrs}), weight decay "
            f"{self.weight_decay:g}, dropout {dropout_probability(self.drop_rate):g}, {clip}; {runs}; scored at the {scored}"
        )


#: The reference recipe: one run per mode at the reference's learning rate, scored at the end.
FULL_RECIPE = Recipe()
#: Small enough for a CPU, run under the protocol: one epoch on 320 training rows (40
#: steps), messages cut at 40 tokens; validation and test are the full recipe's 149 and 300
#: rows. Each mode tries three learning rates (its reference rate among them) with seed 0,
#: keeps the one with the lowest validation loss and runs seeds 1 and 2 at it; every run is
#: scored at its best validation step (the whole validation split, every 20 steps).
QUICK_RECIPE = Recipe(
    epochs=1,
    sizes=(320, 149, 300),
    max_length=40,
    eval_every=20,
    eval_batches=None,
    quick=True,
    lr_grid={
        "lora": (5e-5, 2e-4, 8e-4),
        "full": (5e-5, 2.5e-4, 1.25e-3),
        "last-block": (1e-5, 5e-5, 2.5e-4),
    },
    seeds=(0, 1, 2),
    keep_best=True,
)


def choose_recipe(device: torch.device | str, full: bool | None = None) -> Recipe:
    """The full recipe on a CUDA GPU, the quick one elsewhere (or as `full` says); prints which."""
    device = torch.device(device)
    if full is None:
        full = device.type == "cuda"
    if full:
        print(f"Full recipe: {FULL_RECIPE.describe()}.")
        return FULL_RECIPE
    why = "as asked" if device.type == "cuda" else f"no CUDA GPU, running on {device.type}"
    print(
        f"QUICK MODE ({why}): {QUICK_RECIPE.describe()}.\n"
        f"The full recipe (on a CUDA GPU) is: {FULL_RECIPE.describe()}."
    )
    return QUICK_RECIPE


@dataclass
class RunResult:
    """One mode trained and measured."""

    mode: str
    model: nn.Module | None  # None once dropped (tune_mode keeps only the numbers)
    history: History
    trainable: int
    total: int
    peak_memory: int | None  # bytes, CUDA only
    checkpoint_bytes: int
    accuracy: dict[str, float]  # "train", "val", "test" (those measured), on the whole split
    recipe: Recipe | None = None
    seed: int = 0
    device: str = ""  # the device type it trained on: "cuda", "mps", "cpu" ("": not recorded)

    @property
    def lr(self) -> float:
        """The learning rate this run trained with."""
        return math.nan if self.recipe is None else self.recipe.lr[self.mode]

    @property
    def val_loss(self) -> float:
        """The lowest validation loss the run reached (what protocol.tune compares)."""
        return self.history.best_val_loss

    @property
    def val_accuracy(self) -> float:
        """Accuracy on the whole validation split, with the weights the run ended with."""
        return self.accuracy["val"]

    @property
    def test_accuracy(self) -> float:
        """Accuracy on the whole test split, with the weights the run ended with."""
        return self.accuracy["test"]

    @property
    def test_error(self) -> float:
        """1 - test accuracy: the share of test messages classified wrongly."""
        return 1.0 - self.accuracy["test"]

    def row(self) -> dict:
        """The numbers, JSON-ready."""
        return {
            "mode": self.mode,
            "lr": self.lr,
            "seed": self.seed,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "peak_memory_bytes": self.peak_memory,
            "device": self.device,
            "seconds_per_epoch": self.history.seconds_per_epoch,
            "checkpoint_bytes": self.checkpoint_bytes,
            "accuracy": self.accuracy,
            "history": asdict(self.history),
        }


def save_checkpoint(model: nn.Module, mode: str, directory: str | Path, source: GPT2Source) -> Path:
    """What each mode must keep: LoRA the adapter only, full the whole model, last-block its part."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "lora":
        return save_adapter(model, directory / "lora", source)
    keep = {n for n, p in model.named_parameters() if p.requires_grad or mode == "full"}
    state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in keep}
    return write_atomically(directory / f"{mode}.safetensors", save(state))


def checkpoint_size(path: Path) -> int:
    """Bytes on disk of a checkpoint file, or of every file in a checkpoint folder."""
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def run_mode(
    base: nn.Module,
    mode: str,
    loaders: Loaders,
    recipe: Recipe,
    *,
    device: torch.device | str,
    checkpoint_dir: str | Path,
    source: GPT2Source,
    seed: int = 123,
    splits: Sequence[str] = ("train", "val", "test"),
    progress: bool = True,
) -> RunResult:
    """Copy `base`, set up `mode`, train it with `recipe`, then measure it; the model ends on CPU.

    Accuracy is measured on the whole of each split named in `splits` (of "train", "val",
    "test"), with the weights the run ends with: the best validation step's if
    recipe.keep_best, else the last step's. Raises ValueError before copying `base` for an
    out_head with fewer outputs than the labels have classes or still the language-model head
    (forgotten to_classifier), and before any training for a checkpoint_dir that cannot be
    written (assets.writable_folder), unknown splits, a seed that is not an integer, or a mode
    the recipe has no learning rate for.
    """
    device = torch.device(device)
    _check_head(base, loaders.train)
    # Everything that would fail after training fails here, before it.
    checkpoint_dir = writable_folder(checkpoint_dir, "checkpoint_dir")
    if isinstance(splits, str):
        raise ValueError(
            f"splits must be a list of names, got the string {splits!r}; e.g. ('test',)."
        )
    unknown = set(splits) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)}; use 'train', 'val' or 'test'.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    recipe.grid(mode)  # a mode the recipe has no learning rate for
    seed_everything(seed)
    model = setup_mode(
        copy.deepcopy(base), mode, rank=recipe.rank, alpha=recipe.alpha, targets=recipe.targets
    )
    set_dropout(model, recipe.drop_rate)
    counts = count_parameters(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    history = train_classifier(
        model,
        loaders.train,
        loaders.val,
        device=device,
        epochs=recipe.epochs,
        lr=recipe.lr[mode],
        weight_decay=recipe.weight_decay,
        eval_every=recipe.eval_every,
        eval_batches=recipe.eval_batches,
        keep_best=recipe.keep_best,
        grad_clip=recipe.grad_clip,
        seed=seed,
        progress=progress,
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    accuracy = {}
    for name, loader in zip(("train", "val", "test"), loaders[:3], strict=True):
        if name not in splits:
            continue
        if name == "val" and recipe.eval_batches is None:  # measured on all of it while training
            accuracy[name] = history.val_acc[history.steps.index(history.kept_step)]
        else:
            accuracy[name] = evaluate(model, loader, device)[1]
    model.to("cpu")
    path = save_checkpoint(model, mode, checkpoint_dir, source)
    size = checkpoint_size(path)
    return RunResult(
        mode,
        model,
        history,
        counts.trainable,
        counts.total,
        peak,
        size,
        accuracy,
        recipe,
        seed,
        device.type,
    )


def tune_mode(
    base: nn.Module,
    mode: str,
    loaders: Loaders,
    recipe: Recipe,
    *,
    device: torch.device | str,
    checkpoint_dir: str | Path,
    source: GPT2Source,
    reuse: Sequence[RunResult] = (),
) -> protocol.Tuned:
    """`mode` under the protocol: protocol.tune over recipe.grid(mode) and recipe.seeds.

    Each run is a run_mode at one learning rate and seed, scored at its best validation
    step if recipe.keep_best, with its validation accuracy. Test accuracy is measured only
    for the runs at the picked learning rate (those the result reports); then the weights
    are dropped (model None). A run of `reuse` with the same mode, recipe (at that learning
    rate) and seed is taken instead of being trained again. One progress bar counts the
    runs: len(grid) + len(seeds) - 1 of them. Every run writes its checkpoint to the same
    place in `checkpoint_dir`.
    """
    device = torch.device(device)
    grid = recipe.grid(mode)
    bar = tqdm(total=len(grid) + len(recipe.seeds) - 1, desc=mode, unit="run")

    def run(lr: float, seed: int) -> RunResult:
        at_lr = dataclasses.replace(recipe, lr={**recipe.lr, mode: lr})
        reused = [r for r in reuse if (r.mode, r.recipe, r.seed) == (mode, at_lr, seed)]
        result = (
            reused[0]
            if reused
            else run_mode(
                base,
                mode,
                loaders,
                at_lr,
                device=device,
                checkpoint_dir=checkpoint_dir,
                source=source,
                seed=seed,
                splits=("val",),
                progress=False,
            )
        )
        if seed != recipe.seeds[0]:  # the grid is done: this run is at the picked rate
            _measure_test(result, loaders, device, keep_model=bool(reused))
        bar.update(1)
        return result

    try:
        tuned = protocol.tune(mode, run, grid, recipe.seeds)
    finally:
        bar.close()
    first = tuned.runs[0]
    _measure_test(first, loaders, device, keep_model=any(first is r for r in reuse))
    return tuned


def _measure_test(
    result: RunResult, loaders: Loaders, device: torch.device, *, keep_model: bool
) -> None:
    """Put the test accuracy into result.accuracy if missing; then drop the model unless kept."""
    if "test" not in result.accuracy:
        result.model.to(device)
        result.accuracy["test"] = evaluate(result.model, loaders.test, device)[1]
        result.model.to("cpu")
    if not keep_model:
        result.model = None


def grid_report(tuned: Sequence[protocol.Tuned]) -> str:
    """Each mode's learning-rate grid with its validation losses, the pick marked * and
    flagged when it is the largest (protocol's Tuned.grid) or the smallest rate tried."""
    lines = []
    for t in tuned:
        smallest = len(t.lr_scores) > 1 and t.lr == min(t.lr_scores)
        lines.append(t.grid() + ("  (the smallest tried)" if smallest else ""))
    return "\n".join(lines)


def accuracy_table(
    tuned: Sequence[protocol.Tuned], baselines: dict[str, dict[str, float]], fmt: str = ".0f"
) -> str:
    """Validation and test accuracy in %: per mode "mean (low-high)" over its seeds at its
    picked learning rate, formatted with `fmt` (whole percents: seeds spread over several);
    per baseline (fitted on the training rows: no learning rate, no seeds) its one exact
    number, to 0.1 %. baselines: name -> {"val": accuracy, "test": accuracy}."""
    headers = ["method", "lr", "seeds", "val acc %", "test acc %"]
    rows = [
        [t.name, f"{t.lr:g}", len(t.runs)]
        + [t.spread(f"{split}_accuracy", 100).format(fmt) for split in ("val", "test")]
        for t in tuned
    ]
    rows += [
        [name, "-", "-", *(f"{100 * scores[split]:.1f}" for split in ("val", "test"))]
        for name, scores in baselines.items()
    ]
    return protocol.format_table(headers, rows)


def format_bytes(n: float, gb_digits: int = 2) -> str:
    """Bytes in decimal units: "796.9 KB"; gigabytes with `gb_digits` decimals."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.{gb_digits}f} GB"


def _no_peak(device: str) -> str:
    """The peak-memory cell of a run without one: why, by the device type it trained on."""
    if device == "cpu":
        return "n/a (CPU)"  # as notebook 05 prints it: measured on CUDA only
    if device == "cuda":
        return "n/a (CUDA: not measured)"
    if device:
        return f"n/a ({device.upper()}: measured on CUDA only)"
    return "n/a"


def results_table(rows: list[dict], *, measured: bool = False, accuracy: bool = True) -> str:
    """A text table of RunResult.row() dicts: parameters, checkpoint size and (unless
    accuracy=False) accuracies, "-" where a split was not measured; or (measured=True) the
    numbers that vary from run to run: time per epoch and peak memory (measured on CUDA
    only; "n/a" says why for a run on another device)."""
    if measured:
        header = ("mode", "time / epoch", "peak accelerator memory")
        cells = [
            (
                r["mode"],
                f"{r['seconds_per_epoch']:.2f} s",
                _no_peak(r.get("device", ""))
                if r["peak_memory_bytes"] is None
                else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
            )
            for r in rows
        ]
    else:
        splits = ("train", "val", "test") if accuracy else ()
        header = ("mode", "trainable params", "share", "checkpoint", *(f"{s} acc" for s in splits))
        cells = [
            (
                r["mode"],
                f"{r['trainable_params']:,}",
                f"{100 * r['trainable_params'] / r['total_params']:.2f} %",
                format_bytes(r["checkpoint_bytes"]),
                *(f"{100 * r['accuracy'][s]:.1f} %" if s in r["accuracy"] else "-" for s in splits),
            )
            for r in rows
        ]
    widths = [max(len(x) for x in column) for column in zip(header, *cells, strict=True)]
    lines = [
        " | ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in (header, *cells)
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


@torch.no_grad()
def classify_texts(
    model: nn.Module, texts: list[str], tokenizer: Encoding, max_length: int
) -> list[tuple[str, float]]:
    """(label, probability) per text, padded exactly as in training (to `max_length` tokens).

    Computed in eval mode; the model's modes are restored afterwards.
    """
    device = next(model.parameters()).device
    ids = encode(texts, tokenizer, max_length).to(device)
    with evaluating(model):
        probs = torch.softmax(classify_logits(model, ids).float(), dim=-1)
    return [(LABELS[int(p.argmax())], float(p.max())) for p in probs]


def plot_history(history: History, title: str = "") -> Figure:
    """Loss (left) and accuracy (right) on train and validation batches against optimizer step;
    dotted lines mark the ends of epochs."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, what in zip(axes, ("loss", "acc"), strict=True):
        ax.plot(history.steps, getattr(history, f"train_{what}"), "o-", label="train")
        ax.plot(history.steps, getattr(history, f"val_{what}"), "o--", label="validation")
        for end in history.epoch_steps[:-1]:
            ax.axvline(end, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="cross-entropy loss", title="loss")
    axes[1].set(ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_comparison(tuned: Sequence[protocol.Tuned]) -> Figure:
    """Validation loss against optimizer step of every mode at its picked learning rate:
    the mean over seeds as a line, the smallest to largest as a band; dots mark the step
    each run was scored at."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for t in tuned:
        steps = t.runs[0].history.steps
        losses = torch.tensor([r.history.val_loss for r in t.runs])  # (seeds, evaluations)
        accuracy = t.spread("test_accuracy", 100).format(".0f")
        (line,) = ax.plot(
            steps, losses.mean(0), "-", label=f"{t.name}, lr {t.lr:g}: test acc {accuracy} %"
        )
        if len(t.runs) > 1:
            ax.fill_between(
                steps, losses.min(0).values, losses.max(0).values, alpha=0.2, color=line.get_color()
            )
        kept = [
            (r.history.kept_step, r.history.val_loss[steps.index(r.history.kept_step)])
            for r in t.runs
        ]
        ax.plot(*zip(*kept, strict=True), "o", color=line.get_color())
    seeds = len(tuned[0].runs) if tuned else 0
    ax.set(
        xlabel="optimizer step",
        ylabel="validation loss",
        title=f"LoRA vs full fine-tuning vs last block ({seeds} seed{'s' * (seeds != 1)} each)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_results(
    results: list[RunResult], directory: str | Path, name: str, extra: dict, figure: Figure
) -> tuple[Path, Path]:
    """Write results/<name>.json (every number, plus `extra`) and <name>.png, atomically.

    Both files are made in memory first, so bad input (a name with a folder in it, a "runs"
    key in `extra`, something JSON cannot hold, no figure) writes nothing: ValueError.
    """
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"name must be a file name without folders, got {name!r}.")
    if "runs" in extra:
        raise ValueError('extra has a "runs" key, which would be overwritten; rename it.')
    if not isinstance(figure, Figure):
        raise ValueError(f"figure must be a matplotlib Figure, got {type(figure).__name__}.")
    payload = {**extra, "runs": [r.row() for r in results]}
    return write_json_and_png(directory, name, payload, figure, dpi=120)


def write_json_and_png(
    directory: str | Path, stem: str, payload: dict, figure: Figure, dpi: int
) -> tuple[Path, Path]:
    """Write <directory>/<stem>.json (`payload`) and <stem>.png (`figure`), each atomically.

    Both are made in memory first, so a payload JSON cannot hold writes nothing (ValueError);
    the PNG is written first, so a JSON is never without its figure (notebook 05 shows one per
    JSON). Returns the two paths.
    """
    try:
        text = json.dumps(payload, indent=2) + "\n"
    except TypeError as error:
        raise ValueError(
            f"The results hold something JSON cannot write ({error}); pass str(x)."
        ) from None
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / f"{stem}.json", directory / f"{stem}.png"
    write_atomically(png_path, png.getvalue())
    write_atomically(json_path, text)
    return json_path, png_path


def results_dir() -> Path:
    """results/ of the repository checkout (assets.checkout), else data_dir()/results."""
    root = checkout()
    return root / "results" if root else data_dir() / "results"


def saved_results(prefix: str) -> list[tuple[Path, dict]]:
    """(path, contents) of every results/<prefix>*.json, sorted by name."""
    return [(p, json.loads(p.read_text())) for p in sorted(results_dir().glob(f"{prefix}*.json"))]
