"""Pure functions behind the notebooks' sliders: parameter counts, low-rank approximation, scaling.

Each one takes plain numbers (or a matrix), touches no global state and returns numbers;
lora_helpers.plots draws them, and the sliders in the notebooks are thin shells around the plots.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .checks import positive_int
from .lora import LoRALayer

#: How the LoRA update x @ A @ B is scaled: the paper's alpha/rank, rank-stabilised
#: alpha/sqrt(rank) (rsLoRA), and alpha alone (no division, a pitfall).
SCALING_RULES = ("alpha/rank", "alpha/sqrt(rank)", "alpha")


class ParameterComparison(NamedTuple):
    """Weights of a full d x k update against a rank-r LoRA update of the same matrix."""

    d: int
    k: int
    rank: int
    full: int  # d * k
    lora: int  # rank * (d + k): B is d x rank, A is rank x k

    @property
    def ratio(self) -> float:
        """lora / full: the fraction of the full update's weights that LoRA trains."""
        return self.lora / self.full

    @property
    def break_even_rank(self) -> float:
        """The rank at which LoRA has as many weights as the full update: d * k / (d + k)."""
        return self.d * self.k / (self.d + self.k)


def lora_parameter_counts(d: int, k: int, rank: int) -> ParameterComparison:
    """Trainable weights of a full d x k update (d * k) and of its rank-r LoRA (r * (d + k))."""
    for name, value in (("d", d), ("k", k), ("rank", rank)):
        positive_int(name, value)
    if rank > min(d, k):
        raise ValueError(
            f"rank {rank} is larger than min(d={d}, k={k}) = {min(d, k)}, the highest rank a "
            f"{d} x {k} matrix can have; use rank <= {min(d, k)}."
        )
    return ParameterComparison(d, k, rank, d * k, rank * (d + k))


def _check_matrix(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.numel() == 0:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"Expected a non-empty 2-D tensor (a matrix), got {shape}.")


def truncated_svd(W: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-r approximation of W (d, k) in Frobenius norm: U_r diag(S_r) V_r^T, (d, k).

    An integer (or bool) W is converted to torch's default float dtype first; raises
    ValueError for a W that is not a non-empty matrix or a rank outside 0 .. min(d, k).
    """
    _check_matrix(W)
    if not (W.is_floating_point() or W.is_complex()):
        W = W.to(torch.get_default_dtype())  # torch.linalg.svd takes no integer tensors
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(W.shape):
        raise ValueError(
            f"rank must be an integer from 0 to min{tuple(W.shape)} = {min(W.shape)}, got {rank!r}."
        )
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def svd_relative_errors(W: torch.Tensor) -> torch.Tensor:
    """||W - W_r||_F / ||W||_F for every rank r = 0 .. min(d, k): shape (min(d, k) + 1,).

    By Eckart-Young the error of the best rank-r approximation is the norm of the
    singular values left out, so it comes from the singular values alone.
    """
    _check_matrix(W)
    S = torch.linalg.svdvals(W.double())
    total = S.square().sum()
    if total == 0:
        raise ValueError("W is all zeros: its relative approximation error is undefined.")
    left_out = S.square().flip(0).cumsum(0).flip(0)  # left_out[r] = sum of S[r:]^2
    return torch.cat([left_out, left_out.new_zeros(1)]).div(total).sqrt().float()


def low_rank_plus_noise(
    d: int, k: int, *, rank: int = 4, noise: float = 0.05, seed: int = 0
) -> torch.Tensor:
    """A (d, k) matrix with `rank` strong directions plus weak dense noise.

    The low-rank part B @ A has unit-variance entries; the noise has entries of std `noise`.
    """
    for name, value in (("d", d), ("k", k), ("rank", rank)):
        positive_int(name, value)
    if rank > min(d, k):
        raise ValueError(f"rank must be at most min(d, k) = {min(d, k)}, got {rank}.")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}.")
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, rank, generator=g)
    A = torch.randn(rank, k, generator=g) / math.sqrt(rank)
    return B @ A + noise * torch.randn(d, k, generator=g)


def _check_rule(rule: str) -> None:
    if rule not in SCALING_RULES:
        raise ValueError(f"Unknown scaling rule {rule!r}; use one of {SCALING_RULES}.")


def lora_scaling(rank: int, alpha: float, rule: str = "alpha/rank") -> float:
    """The factor in front of x @ A @ B under one of SCALING_RULES."""
    positive_int("rank", rank)
    _check_rule(rule)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    if rule == "alpha/rank":
        return alpha / rank
    return alpha / math.sqrt(rank) if rule == "alpha/sqrt(rank)" else float(alpha)


def lora_layer_arguments(rank: int, alpha: float, rule: str = "alpha/rank") -> tuple[float, bool]:
    """The (alpha, rslora) to give lora.LoRALayer or LinearWithLoRA for the factor of `rule`.

    The layers scale by alpha / rank (or alpha / sqrt(rank) with rslora=True); "alpha"
    alone is alpha * rank in their alpha's place. Raises ValueError for an unknown rule.
    """
    lora_scaling(rank, alpha, rule)  # checks rank, alpha and rule
    if rule == "alpha":
        return float(alpha * rank), False
    return float(alpha), rule == "alpha/sqrt(rank)"


class BriefTraining(NamedTuple):
    """What a few Adam steps did to a LoRALayer: the size of its update, the loss it removed."""

    update_size: float  # ||scaling * (A @ B)||_F
    loss_drop: float  # 1 - loss after / loss before: the fraction of the loss removed


@functools.lru_cache(maxsize=4096)
def brief_training(
    rank: int,
    alpha: float,
    rule: str = "alpha/rank",
    *,
    in_dim: int = 64,
    out_dim: int = 64,
    steps: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
) -> BriefTraining:
    """Train a LoRALayer (in_dim -> out_dim, B = 0 at the start) for `steps` Adam steps.

    The task, a regression y = x @ W_target / sqrt(in_dim) on 128 inputs, is drawn from `seed`, as is A;
    the learning rate is the same for every rank, so only `rank`, `alpha` and the scaling
    `rule` change the result. Runs in float64, deterministic, and cached (a slider that
    comes back to a setting does not train again); leaves the global random state alone.
    Raises ValueError for a bad rank, alpha, rule, in_dim, out_dim or steps.
    """
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("steps", steps)):
        positive_int(name, value)
    layer_alpha, rslora = lora_layer_arguments(rank, alpha, rule)
    lora_parameter_counts(out_dim, in_dim, rank)  # refuses rank > min: LoRALayer only warns
    x, y = _regression_task(in_dim, out_dim, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = LoRALayer(in_dim, out_dim, rank, layer_alpha, rslora=rslora, dtype=torch.float64)
    sizes, losses = _adam_steps(layer, x, y, steps, lr)
    return BriefTraining(sizes[-1], 1 - losses[-1] / losses[0])


def _regression_task(in_dim: int, out_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """128 inputs x (128, in_dim) and targets y = x @ W_target / sqrt(in_dim), float64, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, in_dim, generator=g, dtype=torch.float64)
    y = x @ torch.randn(in_dim, out_dim, generator=g, dtype=torch.float64) / math.sqrt(in_dim)
    return x, y


def _adam_steps(
    layer: LoRALayer, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> tuple[list[float], list[float]]:
    """`steps` Adam steps on the mean squared error; ||ΔW||_F after each step, and the loss
    before the first step and after each step."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    sizes, losses = [], []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        sizes.append(layer.delta_weight().norm().item())
    with torch.no_grad():
        losses.append(torch.nn.functional.mse_loss(layer(x), y).item())
    return sizes, losses


def update_size_after_training(
    rank: int,
    alpha: float,
    rule: str = "alpha/rank",
    *,
    in_dim: int = 64,
    out_dim: int = 64,
    steps: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """||scaling * (A @ B)||_F after `steps` Adam steps: brief_training(...).update_size."""
    return brief_training(
        rank, alpha, rule, in_dim=in_dim, out_dim=out_dim, steps=steps, lr=lr, seed=seed
    ).update_size


#: How A is drawn at the start (B starts at zero in all three), for a LoRALayer's A of shape
#: (in_dim, rank). The LoRA paper (section 4.1) uses "a random Gaussian initialization for A"
#: without a scale; PEFT's init_lora_weights="gaussian" takes std 1/rank, used here.
A_INITS = {
    "paper": "Gaussian, std 1/r (the paper; PEFT's init_lora_weights='gaussian')",
    "PEFT, ours": "Kaiming-uniform on the (r, in) layout: fan-in = in, bound 1/sqrt(in)",
    "book": "Kaiming-uniform on an (in, r) tensor: fan-in = r, bound 1/sqrt(r)",
}


def _check_init(init: str) -> None:
    if init not in A_INITS:
        raise ValueError(f"Unknown initialisation {init!r} for A; use one of {list(A_INITS)}.")


def a_init_std(init: str, in_dim: int, rank: int) -> float:
    """The standard deviation of A's entries under one of A_INITS, for A of shape (in_dim, rank).

    Kaiming-uniform with a = sqrt(5) draws from U(-b, b) with b = 1/sqrt(fan_in), whose std is
    b / sqrt(3); which dimension is the fan-in is what separates PEFT's layout from the book's.
    """
    _check_init(init)
    for name, value in (("in_dim", in_dim), ("rank", rank)):
        positive_int(name, value)
    if init == "paper":
        return 1 / rank
    fan_in = in_dim if init == "PEFT, ours" else rank
    return 1 / math.sqrt(3 * fan_in)


def init_lora_A_(A: torch.Tensor, init: str, generator: torch.Generator | None = None) -> None:
    """Fill A (in_dim, rank) in place as one of A_INITS does; raises ValueError for an unknown one."""
    _check_init(init)
    with torch.no_grad():
        if init == "paper":
            torch.nn.init.normal_(A, std=1 / A.shape[1], generator=generator)
        else:  # nn.Linear's default: kaiming_uniform_(a=sqrt(5)) reads fan-in from dimension 1
            layout = A.T if init == "PEFT, ours" else A
            torch.nn.init.kaiming_uniform_(layout, a=math.sqrt(5), generator=generator)


class FirstSteps(NamedTuple):
    """A LoRALayer's first Adam steps: the update's size and the loss, one entry per step."""

    update_sizes: tuple[float, ...]  # ||scaling * (A @ B)||_F after each step
    losses: tuple[float, ...]  # before the first step, then after each step


@functools.lru_cache(maxsize=256)
def first_steps(
    init: str,
    rank: int = 16,
    alpha: float = 16,
    *,
    dim: int = 768,
    steps: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
) -> FirstSteps:
    """Train a dim -> dim LoRALayer (A drawn as `init` says, B = 0) for `steps` Adam steps.

    The task is brief_training's regression (128 inputs, a random dense target) at GPT-2
    small's width by default. `seed` draws the task and A, so the inits compare on the same
    tasks. float64 and deterministic; cached; leaves the global random state alone.
    Raises ValueError for an unknown init or a bad rank, alpha, dim or steps.
    """
    _check_init(init)
    positive_int("dim", dim)
    positive_int("steps", steps)
    lora_parameter_counts(dim, dim, rank)  # refuses rank > dim
    x, y = _regression_task(dim, dim, seed)
    with torch.random.fork_rng(devices=[]):  # the layer's own draw of A is replaced below
        layer = LoRALayer(dim, dim, rank, alpha, dtype=torch.float64)
    init_lora_A_(layer.A, init, generator=torch.Generator().manual_seed(seed))
    sizes, losses = _adam_steps(layer, x, y, steps, lr)
    return FirstSteps(tuple(sizes), tuple(losses))
