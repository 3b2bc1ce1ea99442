"""LoRA from scratch: the low-rank layer, a frozen linear with LoRA, and model-wide helpers.

A frozen weight W (out_dim x in_dim) gets a trainable low-rank update:

    y = x W^T + b + scaling * (x A B),   A: (in_dim, rank), B: (rank, out_dim)

with scaling = alpha / rank (or alpha / sqrt(rank), "rank-stabilised" LoRA).
B starts at zero, so the layer is exactly the base layer until training moves B.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from .checks import dropout_probability, positive_int


class RankWarning(UserWarning):
    """A LoRA rank above min(in_dim, out_dim): allowed, but its extra parameters buy nothing."""


def check_rank_alpha(rank: int, alpha: float) -> None:
    """Raise ValueError unless rank is a positive integer and alpha a finite, nonzero number."""
    positive_int("rank", rank, "typical values are 4, 8 or 16")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        fix = "a common choice is alpha = rank"
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, (bool, int, float)):
            fix = f"pass float(alpha); its type is {type(alpha).__name__}, not float"
        raise ValueError(f"alpha must be a finite number, got {alpha!r}; {fix}.")
    if alpha == 0:
        raise ValueError(
            "alpha is 0, which scales the update to zero: A and B would get no gradient and "
            "never learn. Use a nonzero alpha; a common choice is alpha = rank."
        )


def _check_rank_alpha(rank: int, alpha: float, in_dim: int, out_dim: int) -> None:
    check_rank_alpha(rank, alpha)
    if rank > min(in_dim, out_dim):
        # PEFT and the reference book accept this (e.g. rank 16 on a 768 -> 2 head), so do we.
        warnings.warn(
            f"rank {rank} is larger than min(in_dim={in_dim}, out_dim={out_dim}) = "
            f"{min(in_dim, out_dim)}: B @ A cannot have a rank above that, so "
            f"{(rank - min(in_dim, out_dim)) * (in_dim + out_dim):,} of its parameters buy "
            f"nothing. Rank {min(in_dim, out_dim)} gives the same updates.",
            RankWarning,
            stacklevel=3,
        )


def _check_dropout_rslora(dropout: float, rslora: bool) -> None:
    dropout_probability(dropout, "dropout")
    if not isinstance(rslora, bool):
        raise ValueError(f"rslora must be True or False, got {rslora!r}.")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA's A and B train in: float32 on a float16/bfloat16 base, else the base's.

    Half-precision adapters lose the small updates they are made of; PEFT keeps them in
    float32 too. Layers cast at the boundary: input to this dtype, the update back.
    """
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


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
        positive_int("in_dim", in_dim)
        positive_int("out_dim", out_dim)
        _check_rank_alpha(rank, alpha, in_dim, out_dim)
        _check_dropout_rslora(dropout, rslora)
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
        update = self.dropout(x) @ self.A @ self.B
        # 1 * update is update, bit for bit: skip that pass over (..., out_dim) at scaling 1
        return update if self.scaling == 1 else self.scaling * update

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
        lora = LoRALayer(  # checks rank, alpha and dropout before the layer is frozen
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout=dropout,
            rslora=rslora,
            dtype=adapter_dtype(linear.weight.dtype),
            device=linear.weight.device,
        )
        self.linear = linear
        self.linear.requires_grad_(False)
        self.lora = lora
        self.merged = False
        # Whether linear.weight holds the update is part of the layer's state: a merged state
        # loaded into an unmerged layer must not add the update a second time.
        self.register_buffer("merged_flag", torch.tensor(False, device=linear.weight.device))
        # What merge() added (scaling, A, B: rank * (in + out) numbers), so that unmerge()
        # subtracts exactly that even if A or B changed while merged (an optimizer step with
        # old gradients, say). A merged state loaded with its base weight keeps the A and B
        # loaded with it. Not saved: unmerge before saving if A or B changed while merged.
        self.merged_update: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(remember_loaded_update)
        # Where else in the model linear.weight's memory is used (GPT-2's tied tok_emb and
        # out_head): (name, module, attribute), set by replace_linear_with_lora; merge() would
        # change those too. Looked up again at merge time, so untying either side counts.
        self.shared_with: list[tuple[str, nn.Module, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        return self.linear(x) + self.lora(x.to(self.lora.A.dtype)).to(x.dtype)

    @torch.no_grad()
    def _add_update(self, sign: float, scaling: float, A: torch.Tensor, B: torch.Tensor) -> None:
        """W <- W + sign * scaling * (A @ B)^T, summed in the wider dtype and rounded once."""
        weight = self.linear.weight
        wide = torch.promote_types(weight.dtype, A.dtype)
        weight.copy_(weight.to(wide) + sign * (scaling * (A @ B).T).to(wide))

    def merge(self) -> None:
        """Fold the update into the base weight: W <- W + scaling * (A @ B)^T. One matmul per call after.

        Raises ValueError, changing nothing, if replace_linear_with_lora found the weight
        shared with another tensor of the model (a tied weight), which merging would change too.
        """
        if not self.merged:
            refuse_shared_weight(self)
            self.merged_update = self._snapshot()
            self._add_update(1.0, *self.merged_update)
            self.merged = True
            self.merged_flag.fill_(True)

    def _snapshot(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        return self.lora.scaling, self.lora.A.detach().clone(), self.lora.B.detach().clone()

    def unmerge(self) -> None:
        """Undo merge(): subtract the update merge() added, back to base plus a separate LoRA path.

        What merge() added is kept in memory only: a merged state saved after A or B changed
        cannot be unmerged exactly once loaded (it is unmerged with the A and B saved with it).
        """
        if self.merged:
            remembered = getattr(self, "merged_update", None)  # None in a layer pickled before
            scaling, A, B = remembered or (self.lora.scaling, self.lora.A, self.lora.B)
            self._add_update(-1.0, scaling, A.to(self.lora.A.device), B.to(self.lora.B.device))
            self.merged_update = None
            self.merged = False
            self.merged_flag.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Merged as the loaded state says. A state with the base weight but no merged_flag
        (a plain from-scratch layer's) is unmerged; one with neither leaves it as it is."""
        key = prefix + "merged_flag"
        self._loads_weight = prefix + "linear.weight" in state_dict  # for the post hook
        if key not in state_dict:
            merged = self.merged and not self._loads_weight
            state_dict = {**state_dict, key: torch.tensor(merged)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.merged = bool(self.merged_flag)

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


def remember_loaded_update(layer: nn.Module, incompatible_keys: object) -> None:
    """After load_state_dict (children included), for LinearWithLoRA and LinearWithDoRA: a
    merged weight loaded from the state goes with the adapter loaded with it; a load of the
    adapter alone into a merged layer keeps what merge() added."""
    if not layer.merged:
        layer.merged_update = None
    elif getattr(layer, "_loads_weight", False):
        layer.merged_update = layer._snapshot()


def refuse_shared_weight(layer: nn.Module) -> None:
    """Raise ValueError if layer.linear.weight shares memory with a tensor of layer.shared_with
    (recorded when the model was wrapped), which a merge would change too."""
    mine = _memory(layer.linear.weight)
    for name, owner, attribute in getattr(layer, "shared_with", ()):
        tensor = getattr(owner, attribute, None)
        if isinstance(tensor, torch.Tensor) and _overlap(_memory(tensor), mine):
            raise ValueError(_shared_message("this layer", name))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def is_adapter(module: nn.Module) -> bool:
    """True for a layer that adapts an nn.Linear with a LoRALayer (LinearWithLoRA, LinearWithDoRA)."""
    return isinstance(getattr(module, "linear", None), nn.Linear) and isinstance(
        getattr(module, "lora", None), LoRALayer
    )


def wrap_linear_layers(
    model: nn.Module,
    wrapper: type[nn.Module],
    target_modules: Iterable[str] | None = None,
    **wrapper_kwargs,
) -> nn.Module:
    """Replace nn.Linear layers of `model` in place by wrapper(linear, **wrapper_kwargs); returns `model`.

    target_modules: None for every nn.Linear, else names matched against each layer's
    qualified name, whole or as a dotted suffix ("W_query" matches "trf_blocks.0.att.W_query").
    With None, layers that already carry a `wrapper` are left alone.
    Raises ValueError, before changing anything, when a chosen layer already carries an
    adapter (LoRA, DoRA): two adapters stacked on one layer are never what was meant.
    """
    if isinstance(model, nn.Linear):
        raise TypeError(
            f"Pass a model that contains nn.Linear layers; for a single layer use "
            f"{wrapper.__name__}(linear, ...) directly."
        )
    adapters = {name: m for name, m in model.named_modules() if is_adapter(m)}
    inside = {id(m.linear) for m in adapters.values()}
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in inside
    }
    targets = None
    if target_modules is not None:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not targets:
            raise ValueError(
                "target_modules is empty, so nothing would be wrapped: name the layers (e.g. "
                "['W_query', 'W_value']), or pass None for every nn.Linear."
            )
    stacked = [
        name
        for name, layer in adapters.items()
        if (not isinstance(layer, wrapper) if targets is None else _targeted(name, targets))
    ]
    if stacked:
        more = f" (and {len(stacked) - 1} more)" if len(stacked) > 1 else ""
        raise ValueError(
            f"Layer {stacked[0]!r}{more} already carries a "
            f"{type(adapters[stacked[0]]).__name__}; a {wrapper.__name__} on top would stack two "
            "adapters on one layer. "
            + (
                "Pass target_modules that leave it out"
                if targets is None
                else "Leave it out of target_modules"
            )
            + ", or start again from the base model."
        )
    if not linears:
        conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        hint = ""
        quantised = [
            n for n, m in model.named_modules() if type(m).__name__.startswith("Quantized")
        ]
        if adapters:
            hint = f" Every nn.Linear is already a {wrapper.__name__}; it was applied twice."
        elif quantised:
            hint = (
                f" Its layers are quantised (e.g. {quantised[0]!r}): add LoRA to them with "
                "lora_helpers.quant.add_lora_to_quantized."
            )
        elif conv1d:
            hint = (
                f" It has {len(conv1d)} transformers Conv1D layers (e.g. {conv1d[0]!r}): "
                "Hugging Face GPT-2 does not use nn.Linear."
            )
        raise ValueError(f"The model has no nn.Linear layer to wrap in {wrapper.__name__}.{hint}")
    places: dict[int, list[str]] = {id(m): [] for m in linears.values()}  # one object, N places
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in places:
            places[id(module)].append(name)
    every_name = [n for names in places.values() for n in names]
    if targets is None:
        chosen = list(linears)
    else:
        unknown = [t for t in targets if not any(_matches(n, t) for n in every_name)]
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(
                f"Unknown target module(s) {unknown}: no nn.Linear in the model is named so. "
                f"Linear layer names end in one of {suffixes}; full names look like "
                f"{list(linears)[:3]}."
            )
        chosen = [n for n in linears if any(_targeted(p, targets) for p in places[id(linears[n])])]
    shared = [places[id(linears[n])] for n in chosen if len(places[id(linears[n])]) > 1]
    if shared:
        raise ValueError(
            f"{' and '.join(repr(n) for n in shared[0])} are one nn.Linear used at "
            f"{len(shared[0])} places; a {wrapper.__name__} at one of them would leave the other "
            "without it. Give each place its own layer (copy.deepcopy) first."
        )
    # Build every wrapper before replacing any, so that a layer it refuses leaves the model as
    # it was; each starts in the train/eval mode of the layer it replaces.
    built = {}
    flags = [(p, p.requires_grad) for n in chosen for p in linears[n].parameters()]
    with warnings.catch_warnings(record=True) as caught:  # one RankWarning for all, below
        warnings.simplefilter("always", RankWarning)
        for name in chosen:
            try:
                built[name] = wrapper(linears[name], **wrapper_kwargs)
            except (ValueError, TypeError) as error:
                for param, flag in flags:  # wrappers freeze their layer: undo that too
                    param.requires_grad_(flag)
                raise type(error)(f"Layer {name!r}: {error} Nothing was wrapped.") from error
            built[name].train(linears[name].training)
    for name, layer in built.items():
        model.set_submodule(name, layer)
    _record_shared_weights(model, built)
    for warning in caught:
        if not issubclass(warning.category, RankWarning):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    rank = wrapper_kwargs.get("rank", 0)
    oversized = [
        f"{name!r} ({linears[name].in_features} -> {linears[name].out_features})"
        for name in chosen
        if rank > min(linears[name].in_features, linears[name].out_features)
    ]
    if oversized:
        warnings.warn(
            f"rank {rank} is larger than min(in, out) of {len(oversized)} layer(s): "
            f"{', '.join(oversized[:3])}{' ...' if len(oversized) > 3 else ''}. Their updates "
            "cannot have a rank above min(in, out), so the extra parameters buy nothing "
            "(allowed, as in PEFT and the reference book; leave such layers out to save them).",
            RankWarning,
            stacklevel=3,
        )
    return model


def _record_shared_weights(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Set each layer's shared_with: where else in the model its weight's memory is used."""
    places = [
        (f"{owner_name}.{attribute}".lstrip("."), owner, attribute, _memory(tensor))
        for owner_name, owner in model.named_modules(remove_duplicate=False)
        for tensors in (owner._parameters, owner._buffers)
        for attribute, tensor in tensors.items()
        if tensor is not None
    ]
    for name, layer in layers.items():
        own, mine = f"{name}.linear.weight", _memory(layer.linear.weight)
        layer.shared_with = [(n, o, a) for n, o, a, m in places if n != own and _overlap(m, mine)]


def _targeted(name: str, targets: list[str]) -> bool:
    return any(_matches(name, t) for t in targets)


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


def lora_scaling(model: nn.Module) -> float:
    """The scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) shared by every LoRA layer of `model`.

    Raises ValueError if the model has no LoRA layers or its layers use different scalings.
    """
    scalings = {layer.lora.scaling for _, layer in lora_layers(model)}
    if len(scalings) != 1:
        found = "no LoRA layers" if not scalings else f"scalings {sorted(scalings)}"
        raise ValueError(f"lora_scaling needs LoRA layers with one scaling; the model has {found}.")
    return scalings.pop()


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Afterwards (even if the block raises) every submodule is back in the mode it had.

    For helpers that switch a caller's model between train() and eval(): they must not
    leave it in eval mode (no dropout) when the caller was training it, or the reverse.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def undone_on_error(model: nn.Module) -> Iterator[nn.Module]:
    """If the block raises, `model` is put back as it was: every nn.Linear and the out_head
    it replaced (by a wrap or a new head) return to their places, every requires_grad flag
    to its value. For loaders that must change all or nothing."""
    places = {
        name: module
        for name, module in model.named_modules()
        if name == "out_head" or isinstance(module, nn.Linear)
    }
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    except BaseException:
        for name, module in places.items():
            model.set_submodule(name, module)
        for param, flag in flags:
            param.requires_grad_(flag)
        raise


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block, the caller's modes after it (see restored_modes)."""
    with restored_modes(model):
        yield model.eval()


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter of `model`; returns `model`."""
    return model.requires_grad_(False)


def _other_adapters(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of the layers that carry a LoRALayer but are not LinearWithLoRA."""
    return [
        (name, type(m).__name__)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "lora", None), LoRALayer) and not isinstance(m, LinearWithLoRA)
    ]


_INSTEAD = {
    "LinearWithDoRA": "lora_helpers.dora's merge_dora, mark_only_dora_as_trainable and "
    "dora_layers (each layer has merge() and unmerge())",
    "QuantizedLinearWithLoRA": "layer.lora for its A and B, and layer.merged_linear() for a "
    "merged, dequantised nn.Linear (a 4-bit base cannot hold the update)",
}


def _refuse_other_adapters(model: nn.Module, action: str, allowed: tuple[str, ...] = ()) -> None:
    """Raise ValueError if `model` has no LinearWithLoRA but has other adapters (DoRA, QLoRA)
    that `action` would silently pass over; `allowed` names classes `action` handles."""
    if any(True for _ in lora_layers(model)):
        return
    for name, kind in _other_adapters(model):
        if kind not in allowed:
            use = _INSTEAD.get(kind, f"the functions made for {kind}")
            raise ValueError(
                f"{action} works on LinearWithLoRA layers, but the model's adapters are {kind} "
                f"(e.g. {name!r}), so it would do nothing: use {use}."
            )


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything, then unfreeze the A and B of every LoRA layer; returns `model`.

    LoRA on a quantised base (quant.QuantizedLinearWithLoRA) counts as LoRA. Raises
    ValueError, changing nothing, for a model whose adapters are DoRA layers (their magnitude
    m would stay frozen) or a model without LoRA layers (nothing would be left to train).
    """
    _refuse_other_adapters(model, "mark_only_lora_as_trainable", ("QuantizedLinearWithLoRA",))
    quantised = [n for n, kind in _other_adapters(model) if kind == "QuantizedLinearWithLoRA"]
    if not quantised and not any(True for _ in lora_layers(model)):
        how = (
            "quant.add_lora_to_quantized(model, rank, alpha), as its linear layers are "
            "quantised (QuantizedLinear)"
            if any(type(m).__name__ == "QuantizedLinear" for m in model.modules())
            else "replace_linear_with_lora(model, rank, alpha) (or wrap_linear_layers)"
        )
        raise ValueError(
            "The model has no LoRA layers, so mark_only_lora_as_trainable would freeze every "
            f"parameter; add LoRA first with {how}."
        )
    freeze(model)
    for _, layer in lora_layers(model):
        layer.lora.requires_grad_(True)
    for name in quantised:  # not DoRA's A and B without its m
        model.get_submodule(name).lora.requires_grad_(True)
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
    """Only the LoRA tensors of `model` ("<layer>.lora.A" and "<layer>.lora.B"), detached.

    Raises ValueError for a model whose adapters are all DoRA or QLoRA layers (it would be {}).
    """
    _refuse_other_adapters(model, "lora_state_dict")
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora.A"] = layer.lora.A.detach()
        state[f"{name}.lora.B"] = layer.lora.B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors into `model`; every key must match a LoRA layer of the same shape."""
    own = dict(_lora_parameters(model))
    _refuse_other_adapters(model, "load_lora_state_dict")
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


def _memory(tensor: torch.Tensor) -> tuple[object, int, int]:
    """(storage, first byte, end byte) of the memory a tensor reads: views and `.data` aliases
    of one weight overlap there. On the meta device (no memory) the tensor stands for itself."""
    if tensor.device.type == "meta":
        return id(tensor), 0, 1
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    extent = 1 + sum(
        (n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    storage = (tensor.device, tensor.untyped_storage().data_ptr())
    return storage, start, start + max(extent, 1) * size


def _overlap(a: tuple[object, int, int], b: tuple[object, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def check_unshared(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> None:
    """Raise ValueError if the base weight of one of `layers` is also used elsewhere in `model`.

    Merging writes into that weight, so a tied weight (GPT-2's out_head and tok_emb, a `.data`
    alias, a transposed view: any tensor whose memory overlaps it) would change the other
    module too. Only ties inside `model` can be seen: merge the whole model, not a part of it.
    """
    tensors = [*model.named_parameters(remove_duplicate=False)]
    tensors += [*model.named_buffers(remove_duplicate=False)]
    memory = [(name, _memory(t)) for name, t in tensors]
    for name, layer in layers:
        own = f"{name}.linear.weight"
        mine = _memory(layer.linear.weight)
        others = [n for n, m in memory if n != own and _overlap(m, mine)]
        if others:
            raise ValueError(_shared_message(repr(name), others[0]))


def _shared_message(layer: str, other: str) -> str:
    return (
        f"Not merging: the base weight of {layer} shares its memory with {other!r} (a tied or "
        "shared weight), so merging would change that too. Leave the layer out of the targets, "
        "or untie it first: layer.linear.weight = nn.Parameter(layer.linear.weight.detach().clone())."
    )


def merge_lora(model: nn.Module) -> nn.Module:
    """merge() every LoRA layer of `model`; returns `model`.

    Raises ValueError, before merging any layer, if a base weight is shared (check_unshared),
    or if the model's adapters are all DoRA or QLoRA layers, which it would pass over.
    """
    _refuse_other_adapters(model, "merge_lora")
    layers = list(lora_layers(model))
    check_unshared(model, layers)
    for _, layer in layers:  # ties recorded when wrapped, e.g. with a module since removed
        refuse_shared_weight(layer)
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """unmerge() every LoRA layer of `model`; returns `model`. Raises ValueError as merge_lora."""
    _refuse_other_adapters(model, "unmerge_lora")
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model
