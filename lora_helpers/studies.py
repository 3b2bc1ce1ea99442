"""Small, fast experiments behind notebooks 06-08: a tiny transformer, a task family, LoRA runs.

The tasks: a sequence of CONTEXT random tokens from a VOCAB-token alphabet; at each position t
the model predicts the token `shift` places back, with some pairs of tokens renamed (swapped).
A model "pretrained" on copy-the-previous-token (shift 1, nothing renamed) is then adapted to a
variant: renaming k pairs changes the token-to-output map by a matrix of rank k, and a larger
shift changes where attention looks. Every linear layer of the model is 32 x 32, so LoRA of
rank r costs 64 r parameters on any of them. One training run takes about a second on a CPU.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .assets import data_dir, write_atomically
from .attention import MultiHeadAttention
from .checks import is_positive_number, positive_int
from .lora import (
    LinearWithLoRA,
    check_rank_alpha,
    count_parameters,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
    restored_modes,
)
from .protocol import SEEDS, BestStep, Spread, Tuned, clearly_lower, format_table, spread, tune

VOCAB = 16  # tokens 0..15
CONTEXT = 8  # tokens per sequence
D_MODEL = 32  # width of every layer: all six linear layers are 32 x 32
IGNORE = -100  # target at positions with nothing `shift` places back
#: The studies run in float64: at this size it costs little, and round-off then stays far
#: below the printed digits on any CPU, thread count or torch version, as long as training is
#: not chaotic. At learning rates of about 0.1 and above, or LoRA scalings of 16 and above
#: at 1e-2, a run is chaotic: differences in the last bit grow until they change the result.
#: The notebooks' grids stay below those settings.
DTYPE = torch.float64

#: The six linear layers of the block, by the names the LoRA paper uses.
LINEAR_NAMES = {
    "Q": "att.W_query",
    "K": "att.W_key",
    "V": "att.W_value",
    "O": "att.out_proj",
    "MLP1": "mlp.fc1",
    "MLP2": "mlp.fc2",
}
#: Choices of matrices to adapt, compared at a fixed parameter budget (LoRA paper, section 7.1).
TARGET_SETS = {
    "Q": ["Q"],
    "K": ["K"],
    "V": ["V"],
    "O": ["O"],
    "Q+K": ["Q", "K"],
    "Q+V": ["Q", "V"],
    "Q+K+V+O": ["Q", "K", "V", "O"],
    "attention+MLP": ["Q", "K", "V", "O", "MLP1", "MLP2"],
}
RULES = ("alpha/r", "alpha/sqrt(r)")


@dataclass(frozen=True)
class Task:
    """Predict the token `shift` places back, with token pairs (2i, 2i+1) for i in `pairs` swapped.

    noise: fraction of training targets replaced by a random token (held-out sets are clean).
    Raises ValueError for a shift, pairs or noise outside these ranges or of another type.
    """

    shift: int = 1
    pairs: tuple[int, ...] = ()
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.shift) or not 1 <= self.shift < CONTEXT:
            raise ValueError(f"shift must be in 1..{CONTEXT - 1}, an integer, got {self.shift!r}.")
        pairs = self.pairs
        if (
            not isinstance(pairs, Sequence)
            or isinstance(pairs, str)
            or not all(_is_int(p) and 0 <= p < VOCAB // 2 for p in pairs)
            or len(set(pairs)) != len(pairs)
        ):
            raise ValueError(
                f"pairs must be distinct integers in 0..{VOCAB // 2 - 1}, as a tuple such as "
                f"(0, 1) (pair i swaps tokens 2i and 2i+1), got {self.pairs!r}."
            )
        noise = self.noise
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0 <= noise < 1:
            raise ValueError(f"noise must be in [0, 1), a number, got {noise!r}.")

    def relabel(self) -> torch.Tensor:
        """The renaming as a lookup table, shape (VOCAB,): token -> target token."""
        table = torch.arange(VOCAB)
        for p in self.pairs:
            table[2 * p], table[2 * p + 1] = 2 * p + 1, 2 * p
        return table


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Pretraining: copy the previous token.
PRETRAIN_TASK = Task()
#: Fine-tuning, part 1: copy the previous token with 4 pairs renamed (a rank-4 change of the map).
RENAME_TASK = Task(pairs=(0, 1, 2, 3))
#: Fine-tuning, part 2: also look one token further back (a change of where attention looks).
SHIFT_RENAME_TASK = Task(shift=2, pairs=(0, 1, 2, 3))


@dataclass(frozen=True)
class Data:
    """Token sequences x and targets y, both (n, CONTEXT); y is IGNORE where undefined."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Splits:
    """Training, validation and test data for one task.

    Validation picks learning rates and the step to keep; test (clean, never used for
    picking) is what the tables report as "held-out".
    """

    train: Data
    val: Data
    test: Data


def make_splits(task: Task, n_train: int, *, n_val: int = 256, n_test: int = 1024) -> Splits:
    """n_train training and n_val validation sequences (noisy as the task says), n_test clean test ones.

    Seeds are fixed (1, 3, 2), so every notebook and test sees the same data for a task.
    """
    return Splits(
        make_data(task, n_train, seed=1),
        make_data(task, n_val, seed=3),
        make_data(task, n_test, seed=2, clean=True),
    )


def make_data(task: Task, n: int, seed: int, *, clean: bool = False) -> Data:
    """n random sequences and their targets under `task`; clean=True skips the label noise."""
    positive_int("n", n, "it is the number of sequences")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    y = task.relabel()[torch.roll(x, task.shift, dims=1)]
    noisy = torch.rand(y.shape, generator=g) < (0.0 if clean else task.noise)
    y = torch.where(noisy, torch.randint(0, VOCAB, y.shape, generator=g), y)
    y[:, : task.shift] = IGNORE
    return Data(x, y)


class MLP(nn.Module):
    """x (..., D_MODEL) -> fc2(gelu(fc1(x))), same shape."""

    def __init__(self, d: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d, dtype=dtype), nn.Linear(d, d, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyTransformer(nn.Module):
    """One pre-norm transformer block: tokens (batch, CONTEXT) -> logits (batch, CONTEXT, VOCAB), in `dtype`."""

    def __init__(self, d: int = D_MODEL, heads: int = 2, dtype: torch.dtype = DTYPE) -> None:
        super().__init__()
        # Built directly in `dtype`: random weights drawn in float32 and then cast would differ
        # in their last bits from one CPU's random-number kernels to another's.
        self.tok_emb = nn.Embedding(VOCAB, d, dtype=dtype)
        self.pos_emb = nn.Embedding(CONTEXT, d, dtype=dtype)
        self.norm1, self.norm2, self.norm_f = (nn.LayerNorm(d, dtype=dtype) for _ in range(3))
        self.att = MultiHeadAttention(d, d, CONTEXT, dropout=0.0, num_heads=heads, dtype=dtype)
        self.mlp = MLP(d, dtype)
        self.head = nn.Linear(d, VOCAB, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        h = h + self.att(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm_f(h))


def loss_and_accuracy(model: nn.Module, data: Data) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the positions that have a target.

    Raises TypeError unless `data` is a Data (one split, e.g. splits.test).
    """
    _check_data(data, "data")
    with torch.no_grad():
        logits = model(data.x)
    mask = data.y != IGNORE
    loss = F.cross_entropy(logits[mask], data.y[mask]).item()
    accuracy = (logits.argmax(-1)[mask] == data.y[mask]).double().mean().item()
    return loss, accuracy


def _check_data(data: object, name: str) -> None:
    if not isinstance(data, Data):
        pick = "; pick one split, e.g. data.test" if isinstance(data, Splits) else ""
        raise TypeError(
            f"{name} must be a Data (token sequences and targets), got a "
            f"{type(data).__name__}{pick}."
        )


def _check_splits(data: object) -> None:
    if not isinstance(data, Splits):
        one = isinstance(data, Data)
        raise TypeError(
            f"data must be the Splits (train, val, test) of make_splits, got a "
            f"{type(data).__name__}; pass the whole make_splits(...) result"
            f"{', not one split' if one else ''}."
        )


def _check_lr(lr: object) -> None:
    if not is_positive_number(lr):
        raise ValueError(f"lr must be a positive number such as 1e-2, got {lr!r}.")


def _plain_linear(model: nn.Module, key: str) -> nn.Linear:
    """The nn.Linear of layer `key` ("Q", ...); ValueError if it is wrapped (LoRA) or missing."""
    layer = model.get_submodule(module_names([key])[0])
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"Layer {key!r} is a {type(layer).__name__}, not a plain nn.Linear; pass the base "
            "model without LoRA (the one lora_run copies)."
        )
    return layer


@dataclass
class Curves:
    """What train() saw: training loss per step, [(step, validation loss)], the best step.

    best: the trainable parameters at best_step (None without validation data);
    best.restore() puts them back into the model.
    """

    train: list[float]
    val: list[tuple[int, float]]
    best: BestStep | None = field(default=None, repr=False)

    @property
    def best_step(self) -> int:
        """The step with the lowest validation loss; the last step without validation data."""
        if self.best is None or self.best.step is None:  # no (finite) validation loss
            return len(self.train)
        return self.best.step


def train(
    model: nn.Module,
    data: Data,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    val: Data | None = None,
    eval_every: int = 10,
) -> Curves:
    """Adam on the trainable parameters of `model`, in place.

    With `val`, the validation loss is measured every `eval_every` steps and after the last
    one, and a copy of the trainable parameters at the step where it was lowest is kept in
    the returned Curves (early stopping, protocol rule 3; `curves.best.restore()` puts them
    back).
    Raises ValueError if nothing in the model is trainable or for a bad lr or count, TypeError
    unless data and val are Data.
    """
    _check_data(data, "data")
    if val is not None:
        _check_data(val, "val")
    _check_lr(lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; add LoRA or unfreeze some first.")
    for name, value in (("steps", steps), ("eval_every", eval_every), ("batch_size", batch_size)):
        positive_int(name, value)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    mask = data.y != IGNORE
    curves = Curves([], [], None if val is None else BestStep(params))

    def validate(step: int) -> None:
        loss = loss_and_accuracy(model, val)[0]
        curves.val.append((step, loss))
        curves.best.offer(step, loss)

    for step in range(steps):
        if val is not None and step % eval_every == 0:
            validate(step)
        idx = (
            torch.randperm(len(data.x), generator=g)[:batch_size]
            if len(data.x) > batch_size
            else slice(None)
        )
        logits, y, m = model(data.x[idx]), data.y[idx], mask[idx]
        loss = F.cross_entropy(logits[m], y[m])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curves.train.append(loss.item())
    if val is not None:
        validate(steps)
    return curves


def pretrained_model(seed: int = 0, steps: int = 300) -> TinyTransformer:
    """A TinyTransformer in DTYPE trained on PRETRAIN_TASK (copy the previous token), frozen, in eval mode.

    Trained once, on one thread (3-5 s on a CPU); the weights are then kept in
    data_dir()/tiny-pretrained/ and loaded, bit for bit what training gives, by the next
    notebook. The file's name holds what those bits depend on: seed, steps, the code of this
    module and of attention.py, the torch version and the CPU kernels in use (another CPU's
    kernels round differently). A file that cannot be read, fails its checksum or holds other
    tensors is trained again and replaced; where none can be written, every call trains (both
    said). The global random state ends the same either way.
    """
    torch.manual_seed(seed)
    model = TinyTransformer()  # drawn even when loading: the random state must not depend on it
    path = _pretrained_path(seed, steps)
    state = _load_checked(path, model.state_dict())
    if state is None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the bits differ with the thread count; one is fastest here
        try:
            train(model, make_data(PRETRAIN_TASK, 4096, seed), steps=steps, lr=3e-3, seed=seed)
        finally:
            torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)  # as a loaded model: no gradients left over
        _save_checked(path, model.state_dict())
    else:
        model.load_state_dict(state)
    return model.requires_grad_(False).eval()


def _pretrained_path(seed: int, steps: int) -> Path:
    key = hashlib.sha256(f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()}".encode())
    for code in (Path(__file__), Path(__file__).with_name("attention.py")):
        key.update(code.read_bytes())
    name = f"seed{seed}-steps{steps}-{key.hexdigest()[:16]}.safetensors"
    return data_dir() / "tiny-pretrained" / name


def _digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


_FIX = "free space, fix its permissions or set LORA_DATA_DIR to a writable folder"


def _load_checked(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The state kept at `path`, or None (said why) if there is none, it cannot be read, its
    checksum fails, or its tensors' names, shapes or dtypes are not those of `like`."""
    try:
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            state = {name: f.get_tensor(name) for name in f.keys()}
    except PermissionError as error:
        print(f"Cannot read {path} ({error}); training the base instead. To keep it: {_FIX}.")
        return None
    except Exception as error:  # safetensors' error for a truncated or foreign file
        print(f"{path}: unreadable ({error}); training the base again.")
        return None
    if expected != _digest(state):
        print(f"{path}: checksum failed; training the base again.")
        return None
    if {k: (v.shape, v.dtype) for k, v in state.items()} != {
        k: (v.shape, v.dtype) for k, v in like.items()
    }:
        print(f"{path}: holds other tensors than this model's; training the base again.")
        return None
    return state


def _save_checked(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write `state` to `path` with its checksum, atomically; a failure is said, not raised."""
    state = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, save(state, metadata={"sha256": _digest(state)}))
    except OSError as error:  # a full disk, a read-only folder
        print(f"Could not keep the pretrained base in {path.parent} ({error}): {_FIX}.")


def module_names(keys: Sequence[str]) -> list[str]:
    """Short names ("Q", "MLP1", ...) -> the model's module names ("att.W_query", ...)."""
    unknown = [k for k in keys if k not in LINEAR_NAMES]
    if unknown or not keys:
        raise ValueError(
            f"Unknown layer name(s) {unknown or list(keys)!r}; use some of {list(LINEAR_NAMES)}."
        )
    return [LINEAR_NAMES[k] for k in keys]


@dataclass
class Run:
    """One fine-tuning run, scored at its best validation step.

    val_loss: the lowest validation loss (what protocol.tune compares); train_loss,
    heldout_loss and heldout_accuracy: the kept model on the training and test data;
    last_heldout_loss: the test loss after the last step, had we not stopped early.
    """

    label: str
    model: nn.Module = field(repr=False)
    trainable: int
    lr: float
    curves: Curves = field(repr=False)
    val_loss: float
    train_loss: float
    heldout_loss: float
    heldout_accuracy: float
    last_heldout_loss: float

    @property
    def best_step(self) -> int:
        """The step kept (0: before training, when no step improved the validation loss)."""
        return self.curves.best_step


def train_run(
    model: nn.Module,
    data: Splits,
    *,
    label: str,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    eval_every: int = 10,
) -> Run:
    """Train the trainable parameters of `model` in place with early stopping on data.val.

    Trains in train mode and measures in eval mode; the model's modes are restored after.
    Raises TypeError unless `data` is a Splits, and train's errors.
    """
    _check_splits(data)
    with restored_modes(model):
        model.train()
        curves = train(
            model, data.train, steps=steps, lr=lr, seed=seed, val=data.val, eval_every=eval_every
        )
        model.eval()
        last_loss = loss_and_accuracy(model, data.test)[0]
        curves.best.restore()
        loss, accuracy = loss_and_accuracy(model, data.test)
        train_loss = loss_and_accuracy(model, data.train)[0]
    return Run(
        label=label,
        model=model,
        trainable=count_parameters(model).trainable,
        lr=lr,
        curves=curves,
        val_loss=min(v for _, v in curves.val),
        train_loss=train_loss,
        heldout_loss=loss,
        heldout_accuracy=accuracy,
        last_heldout_loss=last_loss,
    )


def lora_run(
    base: nn.Module,
    data: Splits,
    rank: int,
    alpha: float,
    *,
    rule: str = "alpha/r",
    targets: Sequence[str] = ("Q", "K", "V", "O"),
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    eval_every: int = 10,
) -> Run:
    """Fine-tune a copy of `base` with LoRA on `targets` (short names); `base` is not touched.

    Raises TypeError unless `data` is a Splits, ValueError for a bad rule, rank, alpha or lr.
    """
    _check_splits(data)
    _check_lr(lr)
    scaling_of(rank, alpha, rule)  # checks the rule
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    replace_linear_with_lora(
        model, rank, alpha, module_names(targets), rslora=rule == "alpha/sqrt(r)"
    )
    mark_only_lora_as_trainable(model)
    label = f"LoRA, rank {rank}, alpha {alpha:g}, {rule}"
    return train_run(model, data, label=label, steps=steps, lr=lr, seed=seed, eval_every=eval_every)


def full_finetune_run(
    base: nn.Module,
    data: Splits,
    *,
    targets: Sequence[str] = tuple(LINEAR_NAMES),
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 10,
) -> Run:
    """Train every entry of the weight matrices `targets` of a copy of `base` (biases stay frozen).

    Raises TypeError unless `data` is a Splits, ValueError for a bad lr or a target layer that
    is not a plain nn.Linear (a base that carries LoRA).
    """
    _check_splits(data)
    _check_lr(lr)
    module_names(targets)  # known names, at least one
    for key in targets:
        _plain_linear(base, key)
    model = copy.deepcopy(base).requires_grad_(False)
    for key in targets:
        _plain_linear(model, key).weight.requires_grad_(True)
    return train_run(
        model,
        data,
        label="full fine-tuning",
        steps=steps,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
    )


def plot_runs(runs: Sequence[Run], title: str = "") -> plt.Figure:
    """Training loss (thin) and validation loss (thick) against step, the kept step as a dot."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.plot(run.curves.train, color=color, alpha=0.35, lw=1)
        steps, losses = zip(*run.curves.val, strict=True)
        ax.plot(steps, losses, color=color, lw=2, label=f"{run.label}: test {run.heldout_loss:.2f}")
        ax.plot(run.curves.best_step, run.val_loss, "o", color=color)
    ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title=title)
    ax.legend(fontsize=8, title="thin: training, thick: validation, dot: kept", title_fontsize=8)
    fig.tight_layout()
    return fig


def rank_alpha_figure(
    base: nn.Module, data: Splits, rank: int, alpha: float, rule: str
) -> plt.Figure:
    """The slider's function: one LoRA run (Q, K, V, O) with these settings, plotted."""
    run = lora_run(base, data, rank, alpha, rule=rule)
    return plot_runs([run], title=f"scaling = {rule} = {scaling_of(rank, alpha, rule):.3g}")


def scaling_of(rank: int, alpha: float, rule: str) -> float:
    """The factor LoRA multiplies its update by: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    check_rank_alpha(rank, alpha)
    return alpha / (rank if rule == "alpha/r" else math.sqrt(rank))


@dataclass
class Sweep:
    """A grid of runs under one scaling rule: losses of shape (seeds, ranks, alphas)."""

    ranks: list[int]
    alphas: list[float]
    rule: str
    train_loss: torch.Tensor
    heldout_loss: torch.Tensor


def sweep_rank_alpha(
    base: nn.Module,
    data: Splits,
    ranks: Sequence[int],
    alphas: Sequence[float],
    *,
    rules: Sequence[str] = RULES,
    steps: int = 150,
    lr: float = 1e-2,
    seeds: Sequence[int] = SEEDS,
) -> list[Sweep]:
    """One LoRA run (Q, K, V, O) per (rank, alpha, seed) and rule; runs with equal scaling are shared.

    Raises ValueError if ranks, alphas, rules or seeds is empty, and lora_run's errors.
    """
    for name, values in (("ranks", ranks), ("alphas", alphas), ("rules", rules), ("seeds", seeds)):
        if len(values) == 0:
            raise ValueError(f"{name} is empty; give at least one value to sweep.")
    done: dict[tuple[int, float, int], Run] = {}  # at rank 1 both rules give the same run
    sweeps = []
    for rule in rules:
        shape = (len(seeds), len(ranks), len(alphas))
        train_loss = torch.empty(shape, dtype=DTYPE)
        heldout_loss = torch.empty(shape, dtype=DTYPE)
        for s, seed in enumerate(seeds):
            for i, rank in enumerate(ranks):
                for j, alpha in enumerate(alphas):
                    key = (rank, scaling_of(rank, alpha, rule), seed)
                    if key not in done:
                        done[key] = lora_run(
                            base,
                            data,
                            rank,
                            alpha,
                            rule=rule,
                            steps=steps,
                            lr=lr,
                            seed=seed,
                            eval_every=10,
                        )
                    train_loss[s, i, j] = done[key].train_loss
                    heldout_loss[s, i, j] = done[key].heldout_loss
        sweeps.append(
            Sweep(list(ranks), [float(a) for a in alphas], rule, train_loss, heldout_loss)
        )
    return sweeps


def best_alphas(sweep: Sweep) -> list[str]:
    """Per rank, a line naming the alpha with the lowest mean test loss and whether the next best is within its spread."""
    lines = []
    for i, rank in enumerate(sweep.ranks):
        grid = sweep.heldout_loss[:, i, :]  # (seeds, alphas)
        order = grid.mean(0).argsort().tolist()
        best = spread(grid[:, order[0]].tolist())
        line = f"rank {rank:>2}: best alpha {sweep.alphas[order[0]]:g}, test loss {best.format()}"
        if len(order) > 1:
            second = spread(grid[:, order[1]].tolist())
            ahead = (
                "clearly ahead of the next best,"
                if clearly_lower(best, second)
                else "within the spread of"
            )
            line += f", {ahead} alpha {sweep.alphas[order[1]]:g} ({second.format()})"
        lines.append(line)
    return lines


def plot_sweeps(sweeps: Sequence[Sweep]) -> plt.Figure:
    """Heat maps of mean training loss (top row) and held-out loss (bottom row) over seeds, one column per rule.

    Raises ValueError for no sweeps or a sweep without ranks or alphas.
    """
    if not sweeps or any(s.heldout_loss.numel() == 0 for s in sweeps):
        raise ValueError(
            "Nothing to plot: give sweep_rank_alpha's sweeps, with at least one rank and alpha."
        )
    fig, axes = plt.subplots(
        2, len(sweeps), figsize=(4.2 * len(sweeps), 5.6), squeeze=False, layout="constrained"
    )
    for row, which in enumerate(("train_loss", "heldout_loss")):
        grids = [getattr(s, which).mean(0) for s in sweeps]
        vmin, vmax = min(g.min().item() for g in grids), max(g.max().item() for g in grids)
        for ax, sweep, grid in zip(axes[row], sweeps, grids, strict=True):
            image = ax.imshow(grid.numpy(), cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    dark = grid[i, j] > (vmin + vmax) / 2
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
            ax.set_xticks(range(len(sweep.alphas)), [f"{a:g}" for a in sweep.alphas])
            ax.set_yticks(range(len(sweep.ranks)), sweep.ranks)
            name = "training loss" if which == "train_loss" else "held-out loss"
            ax.set(xlabel="alpha", ylabel="rank", title=f"{name}, scaling {sweep.rule}")
        fig.colorbar(image, ax=axes[row].tolist(), shrink=0.9)
    return fig


@dataclass
class RankFit:
    """Losses against rank, one row per seed: (len(seeds), len(ranks)) each.

    heldout_loss: at each run's best validation step; last_heldout_loss: after the last step.
    """

    ranks: list[int]
    train_loss: torch.Tensor
    heldout_loss: torch.Tensor
    last_heldout_loss: torch.Tensor


def fit_by_rank(
    base: nn.Module,
    data: Splits,
    ranks: Sequence[int],
    *,
    scaling: float = 2.0,
    seeds: Sequence[int] = SEEDS,
    steps: int = 300,
    lr: float = 1e-2,
) -> RankFit:
    """LoRA (Q, K, V, O) at each rank with alpha = scaling * rank (so alpha/r is fixed), per seed."""
    shape = (len(seeds), len(ranks))
    train_loss, heldout_loss, last = (torch.empty(shape, dtype=DTYPE) for _ in range(3))
    for s, seed in enumerate(seeds):
        for i, rank in enumerate(ranks):
            run = lora_run(base, data, rank, scaling * rank, steps=steps, lr=lr, seed=seed)
            train_loss[s, i], heldout_loss[s, i] = run.train_loss, run.heldout_loss
            last[s, i] = run.last_heldout_loss
    return RankFit(list(ranks), train_loss, heldout_loss, last)


def plot_fit_by_rank(fit: RankFit) -> plt.Figure:
    """Held-out loss against rank, at the best validation step and after the last step: mean and range over seeds."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, grid, color in (
        ("held-out, after the last step", fit.last_heldout_loss, "C3"),
        ("held-out, at the best validation step", fit.heldout_loss, "C2"),
        ("training (noisy labels), at the best step", fit.train_loss, "C0"),
    ):
        mean, low, high = grid.mean(0), grid.min(0).values, grid.max(0).values
        ax.errorbar(
            fit.ranks,
            mean,
            yerr=[mean - low, high - mean],
            fmt="o-",
            color=color,
            capsize=3,
            label=name,
        )
    ax.set(xscale="log", xlabel="rank r", ylabel="cross-entropy (mean, seed range)")
    ax.set_xticks(fit.ranks, [str(r) for r in fit.ranks])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def budget_ranks(budget: int, target_sets: dict[str, list[str]] = TARGET_SETS) -> dict[str, int]:
    """The LoRA rank that spends exactly `budget` parameters on each target set.

    Every linear layer is D_MODEL x D_MODEL, so rank r on k of them costs r * k * 2 * D_MODEL.
    Raises ValueError for a budget that is not a positive integer, that does not divide into
    whole ranks for every set, or that gives a set a rank above D_MODEL; TypeError unless
    target_sets is a dict of name -> list of short layer names (as TARGET_SETS).
    """
    positive_int("budget", budget, "it is a number of parameters, e.g. 768")
    if not isinstance(target_sets, dict) or any(
        isinstance(keys, str) or not isinstance(keys, Sequence) for keys in target_sets.values()
    ):
        raise TypeError(
            "target_sets must be a dict of name -> list of short layer names, e.g. "
            f"{{'Q+V': ['Q', 'V']}} as in studies.TARGET_SETS, got {target_sets!r}."
        )
    costs = {name: len(module_names(keys)) * 2 * D_MODEL for name, keys in target_sets.items()}
    whole = math.lcm(*costs.values())
    for name, per_rank in costs.items():
        if budget % per_rank:
            raise ValueError(
                f"A budget of {budget} parameters does not give {name!r} a whole rank between 1 "
                f"and {D_MODEL} (one rank costs {per_rank}); use a multiple of {whole}."
            )
    for name, per_rank in costs.items():
        if budget // per_rank > D_MODEL:
            raise ValueError(
                f"A budget of {budget} parameters gives {name!r} rank {budget // per_rank}, above "
                f"{D_MODEL}, the most a {D_MODEL} x {D_MODEL} layer can use; use a multiple of "
                f"{whole} up to {D_MODEL * min(costs.values())}."
            )
    return {name: budget // per_rank for name, per_rank in costs.items()}


def compare_targets(
    base: nn.Module,
    data: Splits,
    budget: int,
    *,
    target_sets: dict[str, list[str]] = TARGET_SETS,
    seeds: Sequence[int] = SEEDS,
    lrs: Sequence[float] = (1e-2, 3e-2),
    steps: int = 200,
) -> list[Tuned]:
    """LoRA on each target set at the rank budget_ranks gives it (alpha = 2 * rank).

    Each set gets its own learning rate from `lrs`, picked on validation data (protocol.tune),
    then runs once per seed. Returns one Tuned per set, named as in `target_sets`.
    """
    results = []
    for name, rank in budget_ranks(budget, target_sets).items():

        def run(lr: float, seed: int, name: str = name, rank: int = rank) -> Run:
            return lora_run(
                base,
                data,
                rank,
                2 * rank,
                targets=target_sets[name],
                steps=steps,
                lr=lr,
                seed=seed,
            )

        results.append(tune(name, run, lrs, seeds))
    return results


def targets_table(results: Sequence[Tuned], target_sets: dict[str, list[str]] = TARGET_SETS) -> str:
    """compare_targets' results: rank, parameters, lr, and test loss and accuracy over seeds.

    `target_sets` must be the one compare_targets was given; ValueError for a result whose
    name is not in it.
    """
    unknown = [t.name for t in results if t.name not in target_sets]
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not in target_sets; pass targets_table the same target_sets "
            "that compare_targets was given."
        )
    rows = [
        [
            t.name,
            t.runs[0].trainable // (2 * D_MODEL * len(target_sets[t.name])),
            t.runs[0].trainable,
            f"{t.lr:g}",
            t.spread("heldout_loss").format(".2f"),
            t.spread("heldout_accuracy", 100).format(".1f"),
        ]
        for t in results
    ]
    headers = ["adapted", "rank", "parameters", "lr", "test loss (min-max)", "accuracy % (min-max)"]
    return format_table(headers, rows)


# --- Notebook 07: the rank of a full fine-tuning's update ---------------------------------


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer applies, (out, in): W of an nn.Linear, W + dW of an unmerged LinearWithLoRA."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if isinstance(layer, LinearWithLoRA) and not layer.merged:
        return (layer.linear.weight + layer.lora.delta_weight()).detach()
    raise TypeError(
        f"Expected an nn.Linear or an unmerged LinearWithLoRA, got {type(layer).__name__}."
    )


def weight_deltas(
    base: nn.Module, tuned: nn.Module, keys: Sequence[str] = tuple(LINEAR_NAMES)
) -> dict[str, torch.Tensor]:
    """dW = W_tuned - W_base for each layer key ("Q", ...), each (out, in)."""
    return {
        key: effective_weight(tuned.get_submodule(name))
        - effective_weight(base.get_submodule(name))
        for key, name in zip(keys, module_names(keys), strict=True)
    }


def energy_in_top(singular_values: torch.Tensor, r: int) -> float:
    """Fraction of ||dW||_F^2 in the top r singular values: sum(s[:r]^2) / sum(s^2).

    `singular_values`: 1-D and descending, as torch.linalg.svdvals(dW) returns them.
    Raises ValueError for other input, an r that is not a positive integer, or a zero dW
    (all singular values 0: there is no update to share out).
    """
    s = singular_values
    if not isinstance(s, torch.Tensor) or s.ndim != 1 or (s[1:] > s[:-1]).any():
        raise ValueError(
            "energy_in_top takes the singular values of dW, 1-D and descending; pass "
            "torch.linalg.svdvals(dW), not dW itself."
        )
    positive_int("r", r, "the number of top singular values to count")
    energy = s.double() ** 2
    if energy.sum() == 0:
        raise ValueError("dW is zero (every singular value is 0): this layer's update is empty.")
    return (energy[:r].sum() / energy.sum()).item()


def best_rank_approx(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The closest rank-r matrix to `delta` (out, in) in Frobenius norm: its truncated SVD."""
    if not 1 <= r <= min(delta.shape):
        raise ValueError(f"r must be in 1..{min(delta.shape)} for a {tuple(delta.shape)} matrix.")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def with_deltas(base: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `base` with W += dW on each layer key of `deltas`.

    Raises ValueError for a dW of another shape than its weight (no broadcasting) or a layer
    that is not a plain nn.Linear (a base that carries LoRA).
    """
    for key, delta in deltas.items():
        weight = _plain_linear(base, key).weight
        if not isinstance(delta, torch.Tensor) or delta.shape != weight.shape:
            shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise ValueError(
                f"dW of {key!r} must have the weight's shape {tuple(weight.shape)}, got {shape}."
            )
    model = copy.deepcopy(base)
    with torch.no_grad():
        for key, delta in deltas.items():
            _plain_linear(model, key).weight += delta
    return model


def evaluate_truncated(
    base: nn.Module, deltas: dict[str, torch.Tensor], heldout: Data, ranks: Sequence[int]
) -> list[tuple[float, float]]:
    """(held-out loss, accuracy) of base + every dW cut to its best rank-r approximation, per r.

    Raises TypeError unless `heldout` is a Data (e.g. data.test).
    """
    _check_data(heldout, "heldout")
    return [
        loss_and_accuracy(
            with_deltas(base, {k: best_rank_approx(d, r) for k, d in deltas.items()}), heldout
        )
        for r in ranks
    ]


def plot_spectra(deltas: dict[str, torch.Tensor], mark: int | None = None) -> plt.Figure:
    """Singular values of each dW (left) and the cumulative share of ||dW||^2 (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (key, delta) in enumerate(deltas.items()):
        s = torch.linalg.svdvals(delta)
        index = torch.arange(1, len(s) + 1)
        left.plot(index, s, ".-", color=f"C{i}", label=key)
        right.plot(index, (s**2).cumsum(0) / (s**2).sum(), ".-", color=f"C{i}", label=key)
    left.set(xlabel="index i", ylabel="singular value σ_i of ΔW", yscale="log")
    right.set(xlabel="r", ylabel="share of ||ΔW||² in the top r", ylim=(0, 1.02))
    if mark is not None:
        for ax in (left, right):
            ax.axvline(mark, color="grey", ls=":", lw=1)
    left.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_vs_rank(
    ranks: Sequence[int],
    curves: dict[str, Sequence[float | Spread]],
    reference: dict[str, float],
) -> plt.Figure:
    """Test loss against rank, one line per curve (a Spread per rank draws its seed range as
    error bars), dashed lines for reference losses."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, losses) in enumerate(curves.items()):
        spreads = [v if isinstance(v, Spread) else spread([v]) for v in losses]
        mean = [v.mean for v in spreads]
        err = [
            [m - v.low for m, v in zip(mean, spreads, strict=True)],
            [v.high - m for m, v in zip(mean, spreads, strict=True)],
        ]
        ax.errorbar(ranks, mean, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=name)
    for i, (name, loss) in enumerate(reference.items()):
        ax.axhline(loss, color=f"C{i + len(curves)}", ls="--", lw=1, label=name)
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="test cross-entropy")
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
