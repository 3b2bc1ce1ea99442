"""Fine-tuning a GPT classifier: device choice, the three set-ups, one training loop, measurements.

Modes (set up by `setup_mode`):
- "lora": everything frozen, LoRA (rank, alpha) on the target nn.Linear layers.
- "full": every parameter trainable.
- "last-block": the last transformer block, the final norm and the head trainable.

`run_mode` trains one mode on a copy of a base model and measures what the LoRA
articles claim: trainable parameters, peak accelerator memory, time per epoch,
checkpoint size on disk, and accuracy.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapters import save_adapter
from .assets import data_dir
from .data import LABELS, Loaders, encode
from .gpt2 import GPT2Source, classify_logits
from .lora import count_parameters, mark_only_lora_as_trainable, replace_linear_with_lora

if TYPE_CHECKING:
    from tiktoken import Encoding

MODES = ("lora", "full", "last-block")


class TrainingStopped(RuntimeError):
    """Training stopped early for a reason the message explains (NaN loss, out of memory)."""


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if available, then Apple's MPS, then CPU (or `prefer`); prints the choice."""
    if prefer is not None:
        device = torch.device(prefer)
        why = "as asked"
    elif torch.cuda.is_available():
        device, why = torch.device("cuda"), torch.cuda.get_device_name(0)
    elif torch.backends.mps.is_available():
        device, why = torch.device("mps"), "Apple GPU"
    else:
        device, why = torch.device("cpu"), "no CUDA or MPS GPU found"
    print(f"Device: {device.type} ({why})")
    return device


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: "nvidia-h100-80gb-hbm3", "mps", "cpu"."""
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
    """What one training run saw: loss and accuracy on a few train and val batches at each
    evaluation, and where the epochs ended."""

    steps: list[int] = field(default_factory=list)  # optimizer step of each evaluation
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)  # step at the end of each epoch
    steps_done: int = 0
    steps_per_epoch: int = 0
    train_seconds: float = 0.0  # optimizer steps only, evaluations excluded

    @property
    def seconds_per_epoch(self) -> float:
        """Training time scaled to one full pass over the training loader."""
        return self.train_seconds * self.steps_per_epoch / max(self.steps_done, 1)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA GPUs that support it, else a no-op context."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, max_batches: int | None = None
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over `loader`, or its first `max_batches` batches."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (ids, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids, labels = ids.to(device), labels.to(device)
        with _autocast(device):
            logits = classify_logits(model, ids).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
    model.train(was_training)
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
    device: torch.device,
    epochs: int = 5,
    lr: float = 8e-4,
    weight_decay: float = 0.1,
    max_steps: int | None = None,
    eval_every: int = 50,
    eval_batches: int = 5,
    grad_clip: float | None = 1.0,
    seed: int = 123,
    progress: bool = True,
) -> History:
    """Train `model` (on `device`) with AdamW on the last-token cross-entropy; returns its History.

    Batches are (ids (batch, tokens), labels (batch,)). Every `eval_every` steps (and at the
    end) the loss and accuracy on `eval_batches` train and val batches are recorded.
    A NaN loss or running out of memory stops with a TrainingStopped that says what to change.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters; call setup_mode(model, mode) first."
        )
    if epochs < 1 or len(train_loader) == 0:
        raise ValueError("Need epochs >= 1 and a non-empty training loader.")
    seed_everything(seed)
    if train_loader.generator is not None:  # the same batches in the same order on every run
        train_loader.generator.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda"
    )
    history = History(steps_per_epoch=len(train_loader))
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
                loss = _train_step(model, optimizer, params, ids, labels, device, grad_clip)
                if not math.isfinite(loss):
                    raise TrainingStopped(
                        f"The loss became {loss} at step {step + 1}: lower the learning rate "
                        f"(it is {lr:g}; try {lr / 10:g}) or keep gradient clipping on."
                    )
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if step % eval_every == 0 or step == total:
                    _sync(device)
                    history.train_seconds += time.perf_counter() - started
                    history.steps.append(step)
                    for name, loader in (("train", train_loader), ("val", val_loader)):
                        loss_value, accuracy = evaluate(model, loader, device, eval_batches)
                        getattr(history, f"{name}_loss").append(loss_value)
                        getattr(history, f"{name}_acc").append(accuracy)
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
    return history


def _train_step(model, optimizer, params, ids, labels, device, grad_clip) -> float:
    ids, labels = ids.to(device), labels.to(device)
    with _autocast(device):
        loss = F.cross_entropy(classify_logits(model, ids).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.item()


def _out_of_memory(device: torch.device, loader: DataLoader) -> TrainingStopped:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    size = loader.batch_size or 1
    return TrainingStopped(
        f"Out of {device.type} memory at batch size {size}: lower the batch size "
        f"(try {max(size // 2, 1)}), shorten max_length, or use LoRA instead of full fine-tuning."
    )


@dataclass(frozen=True)
class Recipe:
    """Training settings. The defaults are the reference's full LoRA recipe."""

    epochs: int = 5
    batch_size: int = 8
    lr: dict[str, float] = field(
        default_factory=lambda: {"lora": 8e-4, "full": 5e-5, "last-block": 5e-5}
    )
    weight_decay: float = 0.1
    rank: int = 16
    alpha: float = 16
    targets: tuple[str, ...] | None = None  # LoRA targets; None: every linear of the blocks
    max_length: int | None = None  # None: the longest training message
    sizes: tuple[int, int, int] | None = None  # (train, val, test) rows; None: all
    eval_every: int = 50
    eval_batches: int = 5
    quick: bool = False

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
        return (
            f"{self.epochs} epoch(s), batch {self.batch_size}, {rows}, padded to {tokens}; "
            f"LoRA r={self.rank}, alpha={self.alpha:g}{where}; AdamW lr ({lrs}), weight decay {self.weight_decay:g}"
        )


FULL_RECIPE = Recipe()
#: Small enough for a CPU: one epoch on a third of the training rows, messages cut at 64
#: tokens; validation and test are the full recipe's 149 and 300 rows.
QUICK_RECIPE = Recipe(
    epochs=1, sizes=(480, 149, 300), max_length=64, eval_every=10, eval_batches=10, quick=True
)


def choose_recipe(device: torch.device, full: bool | None = None) -> Recipe:
    """The full recipe on a CUDA GPU, the quick one elsewhere (or as `full` says); prints which."""
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
    model: nn.Module
    history: History
    trainable: int
    total: int
    peak_memory: int | None  # bytes, CUDA only
    checkpoint_bytes: int
    accuracy: dict[str, float]  # "train", "val", "test" on the whole split

    def row(self) -> dict:
        """The numbers, JSON-ready."""
        return {
            "mode": self.mode,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "peak_memory_bytes": self.peak_memory,
            "seconds_per_epoch": self.history.seconds_per_epoch,
            "checkpoint_bytes": self.checkpoint_bytes,
            "accuracy": self.accuracy,
            "history": asdict(self.history),
        }


def save_checkpoint(model: nn.Module, mode: str, directory: Path, source: GPT2Source) -> Path:
    """What each mode must keep: LoRA the adapter only, full the whole model, last-block its part."""
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "lora":
        return save_adapter(model, directory / "lora", source)
    keep = {n for n, p in model.named_parameters() if p.requires_grad or mode == "full"}
    state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in keep}
    path = directory / f"{mode}.safetensors"
    part = path.with_name(path.name + ".part")
    save_file(state, str(part))
    os.replace(part, path)
    return path


def checkpoint_size(path: Path) -> int:
    """Bytes on disk of a checkpoint file, or of every file in a checkpoint folder."""
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def run_mode(
    base: nn.Module,
    mode: str,
    loaders: Loaders,
    recipe: Recipe,
    *,
    device: torch.device,
    checkpoint_dir: Path,
    source: GPT2Source,
    seed: int = 123,
) -> RunResult:
    """Copy `base`, set up `mode`, train it with `recipe`, then measure it; the model ends on CPU."""
    seed_everything(seed)
    model = setup_mode(
        copy.deepcopy(base), mode, rank=recipe.rank, alpha=recipe.alpha, targets=recipe.targets
    )
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
        seed=seed,
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    accuracy = {
        name: evaluate(model, loader, device)[1]
        for name, loader in zip(("train", "val", "test"), loaders[:3], strict=True)
    }
    model.to("cpu")
    path = save_checkpoint(model, mode, checkpoint_dir, source)
    return RunResult(
        mode, model, history, counts.trainable, counts.total, peak, checkpoint_size(path), accuracy
    )


def _size(n: float) -> str:
    """Bytes in decimal units: "796.9 KB"."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.2f} GB"


def results_table(rows: list[dict], *, measured: bool = False) -> str:
    """A text table of RunResult.row() dicts: parameters, checkpoint size and accuracies,
    or (measured=True) the numbers that vary from run to run: time per epoch and peak memory."""
    if measured:
        header = ("mode", "time / epoch", "peak accelerator memory")
        cells = [
            (
                r["mode"],
                f"{r['seconds_per_epoch']:.2f} s",
                "n/a (CPU)"
                if r["peak_memory_bytes"] is None
                else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
            )
            for r in rows
        ]
    else:
        header = (
            "mode",
            "trainable params",
            "share",
            "checkpoint",
            "train acc",
            "val acc",
            "test acc",
        )
        cells = [
            (
                r["mode"],
                f"{r['trainable_params']:,}",
                f"{100 * r['trainable_params'] / r['total_params']:.2f} %",
                _size(r["checkpoint_bytes"]),
                *(f"{100 * r['accuracy'][s]:.1f} %" for s in ("train", "val", "test")),
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
    """(label, probability) per text, padded exactly as in training (to `max_length` tokens)."""
    model.eval()
    device = next(model.parameters()).device
    ids = encode(texts, tokenizer, max_length).to(device)
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


def plot_comparison(results: list[RunResult]) -> Figure:
    """Validation loss of every mode against optimizer step, one line each."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in results:
        ax.plot(
            r.history.steps,
            r.history.val_loss,
            "o-",
            label=f"{r.mode} (test acc {100 * r.accuracy['test']:.1f} %)",
        )
    ax.set(
        xlabel="optimizer step",
        ylabel="validation loss",
        title="LoRA vs full fine-tuning vs last block",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_results(
    results: list[RunResult], directory: Path, name: str, extra: dict, figure: Figure
) -> tuple[Path, Path]:
    """Write results/<name>.json (every number, plus `extra`) and <name>.png, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / f"{name}.json", directory / f"{name}.png"
    payload = {**extra, "runs": [r.row() for r in results]}
    part = json_path.with_name(json_path.name + ".part")
    part.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(part, json_path)
    part = png_path.with_name(png_path.name + ".part")
    figure.savefig(part, format="png", dpi=120)
    os.replace(part, png_path)
    return json_path, png_path


def results_dir() -> Path:
    """results/ of the repository checkout, else data_dir()/results (an installed package)."""
    repo = Path(__file__).resolve().parents[1] / "results"
    return repo if (repo / "README.md").is_file() else data_dir() / "results"


def saved_results(prefix: str) -> list[tuple[Path, dict]]:
    """(path, contents) of every results/<prefix>*.json, sorted by name."""
    return [(p, json.loads(p.read_text())) for p in sorted(results_dir().glob(f"{prefix}*.json"))]
