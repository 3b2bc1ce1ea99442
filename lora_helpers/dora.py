"""DoRA from scratch: LoRA on the direction of a weight, plus a trainable magnitude.

DoRA (Liu et al., 2024) splits a weight into a magnitude and a direction and adapts them apart:

    W' = m * (W + dW) / ||W + dW||,   dW = scaling * (A @ B)^T, the LoRA update

The paper writes W as (in x out) and takes the norm of each column, one per output feature.
nn.Linear stores W as (out, in), so here that is the norm of each row: m has shape (out,).
m starts at ||W|| (row by row) and B at zero, so the layer starts exactly as the base layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .lora import (
    LoRALayer,
    adapter_dtype,
    check_unshared,
    freeze,
    lora_layers,
    refuse_shared_weight,
    remember_loaded_update,
    wrap_linear_layers,
)


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[i, :]|| for each output feature i: (out, in) -> (out,)."""
    return torch.linalg.vector_norm(weight, dim=1)


class LinearWithDoRA(nn.Module):
    """A frozen nn.Linear adapted by DoRA: x (..., in) -> x W'^T + b, shape (..., out)."""

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        rslora: bool = False,
        exact_norm_gradient: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearWithDoRA wraps an nn.Linear, got {type(linear).__name__}.")
        lora = LoRALayer(  # checks rank and alpha before the layer is frozen
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            rslora=rslora,
            dtype=adapter_dtype(linear.weight.dtype),
            device=linear.weight.device,
        )
        # m, like A and B, in float32 on a half-precision base
        norms = _row_norms(linear.weight.detach().to(lora.A.dtype))
        if norms.device.type != "meta" and not (norms > 0).all():  # meta: shapes only
            raise ValueError(
                f"Row {int((norms == 0).nonzero()[0])} of the weight is all zeros, so its direction "
                "W / ||W|| is undefined; DoRA needs a weight with no zero rows (use LoRA here)."
            )
        self.linear = linear
        self.linear.requires_grad_(False)
        self.lora = lora
        self.m = nn.Parameter(norms.clone())
        self.exact_norm_gradient = exact_norm_gradient
        # set by merge(): the row norms of W + dW, needed to undo the merge
        self.register_buffer("merged_norms", None)
        # and the m and dW it merged, so that unmerge() undoes exactly that (see LinearWithLoRA)
        self.merged_update: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(remember_loaded_update)
        self.shared_with: list[tuple[str, nn.Module, str]] = []  # see LinearWithLoRA

    @property
    def merged(self) -> bool:
        return self.merged_norms is not None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Merged or not, as the loaded state says: merged_norms is in it only when merged.
        A state without the base weight (e.g. A, B and m alone) leaves it as it is."""
        self._loads_weight = prefix + "linear.weight" in state_dict  # for the post hook
        if prefix + "merged_norms" in state_dict:
            if self.merged_norms is None:
                self.merged_norms = torch.empty_like(self.m)
        elif prefix + "linear.weight" in state_dict:
            self.merged_norms = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapted_weight(self) -> torch.Tensor:
        """W' = m * (W + dW) / ||W + dW|| (row-wise), shape (out, in).

        Backpropagation treats ||W + dW|| as a constant, detached from the gradient graph, as
        the DoRA paper suggests (section 4.3, to reduce the memory training needs) and PEFT
        does; exact_norm_gradient=True lets the gradient flow through the norm as well. The
        forward pass is the same either way.
        """
        combined = self.linear.weight + self.lora.delta_weight()
        norms = _row_norms(combined)
        if not self.exact_norm_gradient:
            norms = norms.detach()
        return (self.m / norms)[:, None] * combined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        return F.linear(x, self.adapted_weight().to(x.dtype), self.linear.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Replace W by W' in place: one plain matmul per call after, same outputs.

        Raises ValueError, changing nothing, for a weight tied elsewhere (refuse_shared_weight).
        """
        if not self.merged:
            refuse_shared_weight(self)
            self.merged_update = self._snapshot()
            m, delta = self.merged_update
            combined = self.linear.weight + delta
            self.merged_norms = _row_norms(combined)
            self.linear.weight.copy_((m / self.merged_norms)[:, None] * combined)

    @torch.no_grad()
    def _snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m.clone(), self.lora.delta_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W = W' * ||W + dW|| / m - dW, with the m and dW that merge() used."""
        if self.merged:
            remembered = getattr(self, "merged_update", None)  # None in a layer pickled before
            m, delta = remembered or (self.m, self.lora.delta_weight())
            m, delta = m.to(self.m.device), delta.to(self.m.device)
            combined = self.linear.weight * (self.merged_norms / m)[:, None]
            self.linear.weight.copy_(combined - delta)
            self.merged_norms = None
            self.merged_update = None

    def extra_repr(self) -> str:
        exact = ", exact_norm_gradient=True" if self.exact_norm_gradient else ""
        return f"merged={self.merged}{exact}"


def replace_linear_with_dora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Iterable[str] | None = None,
    *,
    rslora: bool = False,
    exact_norm_gradient: bool = False,
) -> nn.Module:
    """Replace nn.Linear layers of `model` in place by LinearWithDoRA; returns `model`.

    target_modules as in replace_linear_with_lora: None for every nn.Linear, else names matched
    against each layer's qualified name, whole or as a dotted suffix. exact_norm_gradient as
    in LinearWithDoRA (default: the paper's constant norm).
    """
    return wrap_linear_layers(
        model,
        LinearWithDoRA,
        target_modules,
        rank=rank,
        alpha=alpha,
        rslora=rslora,
        exact_norm_gradient=exact_norm_gradient,
    )


def dora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithDoRA]]:
    """Yield (qualified name, layer) for every LinearWithDoRA in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithDoRA):
            yield name, module


def _refuse_lora_only(model: nn.Module, action: str) -> None:
    """Raise ValueError if `model` has LoRA layers but no DoRA layer: `action` would do nothing."""
    if not any(True for _ in dora_layers(model)):
        found = [name for name, _ in lora_layers(model)]
        if found:
            raise ValueError(
                f"{action} works on LinearWithDoRA layers, but the model's adapters are "
                f"LinearWithLoRA (e.g. {found[0]!r}), so it would do nothing: use "
                "lora_helpers.lora's functions (merge_lora, mark_only_lora_as_trainable)."
            )


def mark_only_dora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything, then unfreeze A, B and m of every DoRA layer; returns `model`.

    Raises ValueError for a model whose adapters are all LoRA layers.
    """
    _refuse_lora_only(model, "mark_only_dora_as_trainable")
    freeze(model)
    for _, layer in dora_layers(model):
        layer.lora.requires_grad_(True)
        layer.m.requires_grad_(True)
    return model


def merge_dora(model: nn.Module) -> nn.Module:
    """merge() every DoRA layer of `model`; returns `model`.

    Raises ValueError, before merging any layer, if a base weight is shared (check_unshared),
    or if the model's adapters are all LoRA layers.
    """
    _refuse_lora_only(model, "merge_dora")
    layers = list(dora_layers(model))
    check_unshared(model, layers)
    for _, layer in layers:
        refuse_shared_weight(layer)
    for _, layer in layers:
        layer.merge()
    return model
