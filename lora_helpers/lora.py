"""LoRA from scratch: the low-rank layer, a frozen linear with LoRA, and model-wide helpers.

A frozen weight W (out_dim x in_dim) gets a trainable low-rank update:

    y = x W^T + b + scaling * (x A B),   A: (in_dim, rank), B: (rank, out_dim)

with scaling = alpha / rank (or alpha / sqrt(rank), "rank-stabilised" LoRA).
B starts at zero, so the layer is exactly the base layer until training moves B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn


def _check_rank_alpha(rank: int, alpha: float, in_dim: int, out_dim: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"rank must be a positive integer, got {rank!r}; typical values are 4, 8 or 16."
        )
    if rank > min(in_dim, out_dim):
        raise ValueError(
            f"rank {rank} is larger than min(in_dim={in_dim}, out_dim={out_dim}) = "
            f"{min(in_dim, out_dim)}: B @ A cannot have a rank above that, so the extra "
            f"parameters buy nothing. Use rank <= {min(in_dim, out_dim)}."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(
            f"alpha must be a finite number, got {alpha!r}; a common choice is alpha = rank."
        )


class LoRALayer(nn.Module):
    """The low-rank update alone: x (..., in_dim) -> scaling * x @ A @ B, shape (..., out_dim).

    dtype and device place A and B as nn.Linear's factory arguments do (default: torch's).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        _check_rank_alpha(rank, alpha, in_dim, out_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        # dtype and device as in nn.Linear: A is drawn in the dtype it will train in (drawing in
        # float32 and casting would give last-bit differences between CPUs' random kernels).
        self.A = nn.Parameter(torch.empty(in_dim, rank, dtype=dtype, device=device))
        # Initialise A as nn.Linear(in_dim, rank) would: Kaiming-uniform with a=sqrt(5),
        # fan_in = in_dim (A.T has nn.Linear's (out, in) layout).
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        # zero: the update starts at 0
        self.B = nn.Parameter(torch.zeros(rank, out_dim, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.dropout(x) @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight, (out_dim, in_dim), in nn.Linear's layout: scaling * (A @ B)^T."""
        return self.scaling * (self.A @ self.B).T

    def extra_repr(self) -> str:
        in_dim, out_dim = self.A.shape[0], self.B.shape[1]
        rule = "alpha/sqrt(rank)" if self.rslora else "alpha/rank"
        return f"in_dim={in_dim}, out_dim={out_dim}, rank={self.rank}, alpha={self.alpha:g}, scaling={rule}={self.scaling:g}"


class LinearWithLoRA(nn.Module):
    """A frozen nn.Linear plus a LoRALayer: x (..., in) -> linear(x) + lora(x), shape (..., out)."""

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            hint = ""
            if type(linear).__name__ == "Conv1D":
                hint = (
                    " Hugging Face GPT-2 stores its projections as transformers' Conv1D "
                    "(weight shape (in, out)), not nn.Linear; use lora_helpers.gpt2.GPTModel, "
                    "whose layers are nn.Linear."
                )
            raise TypeError(
                f"LinearWithLoRA wraps an nn.Linear, got {type(linear).__name__}.{hint}"
            )
        self.linear = linear
        self.linear.requires_grad_(False)
        self.lora = LoRALayer(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout=dropout,
            rslora=rslora,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: W <- W + scaling * (A @ B)^T. One matmul per call after."""
        if not self.merged:
            self.linear.weight += self.lora.delta_weight().to(self.linear.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W <- W - scaling * (A @ B)^T, back to base plus a separate LoRA path."""
        if self.merged:
            self.linear.weight -= self.lora.delta_weight().to(self.linear.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def wrap_linear_layers(
    model: nn.Module,
    wrapper: type[nn.Module],
    target_modules: Iterable[str] | None = None,
    **wrapper_kwargs,
) -> nn.Module:
    """Replace nn.Linear layers of `model` in place by wrapper(linear, **wrapper_kwargs); returns `model`.

    target_modules: None for every nn.Linear, else names matched against each layer's
    qualified name, whole or as a dotted suffix ("W_query" matches "trf_blocks.0.att.W_query").
    Linears already wrapped by `wrapper` (its `.linear`) are left alone.
    """
    if isinstance(model, nn.Linear):
        raise TypeError(
            f"Pass a model that contains nn.Linear layers; for a single layer use "
            f"{wrapper.__name__}(linear, ...) directly."
        )
    wrapped = {id(m.linear) for m in model.modules() if isinstance(m, wrapper)}
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in wrapped
    }
    if not linears:
        conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        hint = ""
        if wrapped:
            hint = f" Every nn.Linear is already a {wrapper.__name__}; it was applied twice."
        elif conv1d:
            hint = (
                f" It has {len(conv1d)} transformers Conv1D layers (e.g. {conv1d[0]!r}): "
                "Hugging Face GPT-2 does not use nn.Linear."
            )
        raise ValueError(f"The model has no nn.Linear layer to wrap in {wrapper.__name__}.{hint}")
    if target_modules is None:
        chosen = list(linears)
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        unknown = [t for t in targets if not any(_matches(n, t) for n in linears)]
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(
                f"Unknown target module(s) {unknown}: no nn.Linear in the model is named so. "
                f"Linear layer names end in one of {suffixes}; full names look like "
                f"{list(linears)[:3]}."
            )
        chosen = [n for n in linears if any(_matches(n, t) for t in targets)]
    for name in chosen:
        model.set_submodule(name, wrapper(linears[name], **wrapper_kwargs))
    return model


def replace_linear_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Iterable[str] | None = None,
    *,
    dropout: float = 0.0,
    rslora: bool = False,
) -> nn.Module:
    """Replace nn.Linear layers of `model` in place by LinearWithLoRA; returns `model`.

    target_modules: None for every nn.Linear, else names matched against each layer's
    qualified name, whole or as a dotted suffix ("W_query" matches "trf_blocks.0.att.W_query").
    """
    return wrap_linear_layers(
        model,
        LinearWithLoRA,
        target_modules,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
    )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """Yield (qualified name, layer) for every LinearWithLoRA in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter of `model`; returns `model`."""
    return model.requires_grad_(False)


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything, then unfreeze the A and B of every LoRA layer; returns `model`."""
    freeze(model)
    for _, layer in lora_layers(model):
        layer.lora.requires_grad_(True)
    return model


class ParameterCount(NamedTuple):
    total: int
    trainable: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"total {self.total:,} | trainable {self.trainable:,} "
            f"({100 * self.trainable_fraction:.2f} %)"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable (requires_grad) parameter counts; shared tensors are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return ParameterCount(total, trainable)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of `model` ("<layer>.lora.A" and "<layer>.lora.B"), detached."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora.A"] = layer.lora.A.detach()
        state[f"{name}.lora.B"] = layer.lora.B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors into `model`; every key must match a LoRA layer of the same shape."""
    own = dict(_lora_parameters(model))
    if not own:
        raise ValueError(
            "The model has no LoRA layers; call replace_linear_with_lora(model, rank, alpha, "
            "target_modules) with the adapter's settings first."
        )
    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError(
            "The model's LoRA layers are merged; call unmerge_lora(model) before loading LoRA weights."
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            "The LoRA weights do not fit this model's LoRA layers: "
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}. "
            "Add LoRA to the same target modules the adapter was trained with."
        )
    for key, param in own.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(
                f"{key} has shape {tuple(state[key].shape)} in the file but {tuple(param.shape)} in "
                "the model: the adapter was trained with another rank or on another base model."
            )
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(state[key])


def _lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, layer in lora_layers(model):
        yield f"{name}.lora.A", layer.lora.A
        yield f"{name}.lora.B", layer.lora.B


def merge_lora(model: nn.Module) -> nn.Module:
    """merge() every LoRA layer of `model`; returns `model`."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """unmerge() every LoRA layer of `model`; returns `model`."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model
