"""Adapters: LoRA weights saved on their own, loaded into a fresh base, swapped, combined.

An adapter is a folder of two files: adapter.safetensors holds only the LoRA tensors
("<layer>.lora.A", "<layer>.lora.B") and the new classifier head ("out_head.*", which no
pretrained checkpoint has); adapter_config.json holds what is needed to rebuild the model
around them: base model name, a fingerprint of its architecture, a probe of its weights
(so that an adapter does not load into another base of the same shapes), rank, alpha,
rslora, the wrapped layers and the number of classes.

combine_lora_states adds several adapters' updates, weighted, into one LoRA state.
export_peft_adapter and load_peft_adapter (from lora_helpers.peft_format) write and read
PEFT's format, for transformers' GPT-2.
For inference, merge with lora_helpers.lora.merge_lora; forward_latency times the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .assets import writable_folder, write_atomically
from .checks import positive_int
from .gpt2 import GPT2Source, to_classifier
from .lora import (
    LinearWithLoRA,
    evaluating,
    load_lora_state_dict,
    lora_layers,
    lora_scaling,
    lora_state_dict,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
    undone_on_error,
)

# PEFT's format, both ways; it lives in its own module, and is offered here with the adapters.
from .peft_format import export_peft_adapter as export_peft_adapter
from .peft_format import load_peft_adapter as load_peft_adapter


def combine_lora_states(
    states: list[dict[str, torch.Tensor] | nn.Module],
    weights: list[float],
    *,
    scalings: list[float] | None = None,
    new_scaling: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One LoRA state whose update is exactly the weighted sum of the given adapters' updates.

    For every layer, adapter i holds A_i (in_dim, r_i), B_i (r_i, out_dim) and is applied
    with scaling s_i: alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA. Pass the models
    the adapters live in, and each one's scaling is read from its own LoRA layers; or pass
    state dicts (lora_state_dict), which do not record it, with `scalings`, e.g.
    lora_scaling(model) of the model each came from. Stacking along the rank dimension,

        A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...] / new_scaling,   B = [B_1; B_2; ...],

    gives new_scaling * A @ B = sum_i w_i s_i A_i @ B_i. Load the result into LoRA layers of
    rank sum(r_i) whose scaling is `new_scaling` (default 1.0: alpha = rank = sum(r_i)).
    """
    if not states:
        raise ValueError("combine_lora_states needs at least one LoRA state; got an empty list.")
    if len(weights) != len(states):
        raise ValueError(
            f"Got {len(states)} LoRA states but {len(weights)} weights; give one weight per state."
        )
    models = [isinstance(state, nn.Module) for state in states]
    if any(models):
        if not all(models) or scalings is not None:
            raise ValueError(
                "Pass either models (each adapter's scaling is read from it) or state dicts "
                "with scalings=[...], not a mix."
            )
        try:
            scalings = [lora_scaling(model) for model in states]
        except ValueError as error:
            raise ValueError(
                f"{error} Pass lora_state_dict(...) of each adapter with scalings=[...] instead, "
                "one scaling per adapter."
            ) from error
        states = [lora_state_dict(model) for model in states]
    if scalings is None:
        raise ValueError(
            "Give each adapter's scaling, e.g. scalings=[lora_scaling(model) for model in "
            "models], or pass the models themselves: alpha / r, or alpha / sqrt(r) for rsLoRA. "
            "A state dict does not record it, and assuming alpha = rank would shrink an "
            "rsLoRA adapter's update."
        )
    scalings = list(scalings)
    if len(scalings) != len(states):
        raise ValueError(
            f"Got {len(states)} LoRA states but {len(scalings)} scalings; give one per state."
        )
    numbers = [*weights, *scalings, new_scaling]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
        raise ValueError("weights, scalings and new_scaling must be finite numbers.")
    if new_scaling == 0:
        raise ValueError("new_scaling must be non-zero; use 1.0 and load with alpha = rank.")
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            diff = sorted(keys ^ set(state))[:4]
            raise ValueError(
                f"LoRA state {i} has other layers than state 0 (differing keys {diff}); "
                "combine adapters trained on the same target modules."
            )
    layers = sorted({k.removesuffix(".A").removesuffix(".B") for k in keys})
    combined: dict[str, torch.Tensor] = {}
    for layer in layers:
        if f"{layer}.A" not in keys or f"{layer}.B" not in keys:
            raise ValueError(
                f"{layer!r} lacks its A or B tensor; pass states made by lora_state_dict(model)."
            )
        As = [s[f"{layer}.A"] for s in states]
        Bs = [s[f"{layer}.B"] for s in states]
        if len({a.shape[0] for a in As}) > 1 or len({b.shape[1] for b in Bs}) > 1:
            raise ValueError(
                f"{layer!r} has different in/out sizes across states; the adapters were "
                "trained on different base models."
            )
        combined[f"{layer}.A"] = torch.cat(
            [w * s / new_scaling * a for w, s, a in zip(weights, scalings, As, strict=True)], dim=1
        )
        combined[f"{layer}.B"] = torch.cat(Bs, dim=0)
    return combined


ADAPTER_FORMAT = "lora-from-scratch adapter v1"
WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


def _head(model: nn.Module) -> nn.Linear:
    head = model.out_head
    return head.linear if isinstance(head, LinearWithLoRA) else head


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under the names they have without LoRA, head left out."""
    wrapped = [f"{name}.linear." for name, _ in lora_layers(model)]
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("out_head.") or ".lora." in key or key.endswith(".merged_flag"):
            continue
        for prefix in wrapped:
            if key.startswith(prefix):
                key = prefix.removesuffix("linear.") + key.removeprefix(prefix)
                break
        tensors[key] = tensor
    return tensors


def base_fingerprint(model: nn.Module) -> str:
    """16 hex digits naming the base architecture: every base tensor's name and shape.

    LoRA tensors and the classifier head are left out, so a model has the same fingerprint
    before and after to_classifier and replace_linear_with_lora.
    """
    digest = hashlib.sha256()
    for key, tensor in _base_tensors(model).items():
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()[:16]


def base_probe(model: nn.Module) -> dict[str, list[str]]:
    """Two weights from each of up to 8 of the base's matrices, as strings: its values' fingerprint.

    The matrices are the first, the last and evenly spaced ones between (for GPT-2: the
    embeddings and block weights alike), read as the base holds them, without LoRA. Two
    bases of the same shapes (pretrained GPT-2 and the random stand-in, stand-ins of two
    seeds, a base whose blocks were fine-tuned) differ here; one base on two CPUs, or in
    another precision, agrees within what load_adapter allows (_probe_tolerance).
    """
    matrices = {
        key: tensor
        for key, tensor in _base_tensors(model).items()
        if tensor.dim() == 2 and tensor.is_floating_point()
    }
    keys = list(matrices)
    picks = sorted({round(j * (len(keys) - 1) / 7) for j in range(8)}) if keys else []
    probe = {}
    for key in (keys[i] for i in picks):
        flat = matrices[key].detach().reshape(-1)
        probe[key] = [f"{float(flat[i]):+.6e}" for i in (flat.numel() // 3, 2 * flat.numel() // 3)]
    return probe


def _probe_tolerance(*dtypes: torch.dtype) -> float:
    """Relative tolerance for one base read in these dtypes: a few roundings of the coarsest,
    at least 1e-5 (float32 weights drawn on another CPU's kernels differ in their last bits)."""
    return max(1e-5, *(2 * torch.finfo(d).eps for d in dtypes))


def _probe_mismatch(config: dict, model: nn.Module) -> list[str]:
    """Names of the probed matrices whose values differ from the adapter's base."""
    saved = config.get("base_probe") or {}
    tensors = _base_tensors(model)
    merged = [
        f"{name}." for name, layer in model.named_modules() if getattr(layer, "merged", False)
    ]
    saved_dtype = getattr(torch, config.get("base_dtype", "float32").removeprefix("torch."))
    ours = base_probe(model)
    bad = []
    for key, values in saved.items():
        if key not in ours or any(key.startswith(prefix) for prefix in merged):
            continue  # a merged layer holds W + dW: nothing to compare there
        tolerance = _probe_tolerance(saved_dtype, tensors[key].dtype)
        if not all(
            math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=1e-7)
            for a, b in zip(values, ours[key], strict=True)
        ):
            bad.append(key)
    return bad


def _head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's own tensors: out_head's parameters, less LoRA and less any the base shares
    (an LM head tied to the token embedding belongs to the base)."""
    base = {id(p) for n, p in model.named_parameters() if not n.startswith("out_head.")}
    return {
        k: v
        for k, v in model.named_parameters(remove_duplicate=False)
        if k.startswith("out_head.") and ".lora." not in k and id(v) not in base
    }


def save_adapter(model: nn.Module, directory: str | Path, source: GPT2Source) -> Path:
    """Write the adapter of `model` (LoRA tensors + head) to `directory`; returns the folder.

    source: the base model's source as returned by load_gpt2_or_fallback (name, pretrained).
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("The model has no LoRA layers to save; set it up with LoRA first.")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("The model's LoRA layers are merged; call unmerge_lora(model) first.")
    settings = {(m.lora.rank, m.lora.alpha, m.lora.rslora) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(
            f"The LoRA layers mix settings {sorted(settings)}; an adapter file holds one "
            "rank, alpha and rslora for all layers."
        )
    ((rank, alpha, rslora),) = settings
    head = _head_parameters(model)  # a head tied to the token embedding is not saved
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in {**lora_state_dict(model), **head}.items()
    }
    config = {
        "format": ADAPTER_FORMAT,
        "base_model": source.name,
        "pretrained": bool(source.pretrained),
        "base_fingerprint": base_fingerprint(model),
        "base_probe": base_probe(model),
        "base_dtype": str(
            next(t for t in _base_tensors(model).values() if t.is_floating_point()).dtype
        ),
        "rank": rank,
        "alpha": alpha,
        "rslora": rslora,
        "n_classes": _head(model).out_features,
        "targets": list(layers),
    }
    directory = writable_folder(directory, "directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILE, save(tensors))
    write_atomically(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """The JSON settings of a saved adapter."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {directory}; pass the folder that save_adapter wrote."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is damaged ({error}); save the adapter again with "
            "lora_helpers.adapters.save_adapter."
        ) from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"{path} is not a {ADAPTER_FORMAT!r} file; save it with lora_helpers.adapters.save_adapter."
        )
    return config


def _describe(name: str, pretrained: bool) -> str:
    return f"{name} ({'pretrained' if pretrained else 'random fallback weights'})"


def load_adapter(
    model: nn.Module, directory: str | Path, source: GPT2Source | None = None
) -> nn.Module:
    """Load a saved adapter into `model`, in place; returns `model`.

    `model` is a fresh base (LoRA and the classifier head are added as the adapter says)
    or a model already carrying LoRA layers of the same settings (the adapter is swapped in).
    source: if given, the base's name and pretrained flag must match the adapter's.
    Raises ValueError when the adapter does not fit; the model is then left exactly as it
    was (its modules, weights, ties and requires_grad flags).
    """
    config = read_adapter_config(directory)
    wanted = _describe(config["base_model"], config["pretrained"])
    if source is not None and (source.name, bool(source.pretrained)) != (
        config["base_model"],
        config["pretrained"],
    ):
        raise ValueError(
            f"This adapter was trained on {wanted}, not on {_describe(source.name, source.pretrained)}; "
            "load it into the base model it was trained on."
        )
    if base_fingerprint(model) != config["base_fingerprint"]:
        raise ValueError(
            f"This adapter was trained on {wanted}, whose layers differ from this model's "
            f"(fingerprint {config['base_fingerprint']} vs {base_fingerprint(model)}); "
            "load it into the base model it was trained on."
        )
    differ = _probe_mismatch(config, model)  # adapters saved before probes existed: none
    if differ:
        raise ValueError(
            f"This adapter was trained on {wanted}, whose weights differ from this model's "
            f"(same shapes, other values, e.g. in {differ[0]!r}: another checkpoint, a "
            "fine-tuned copy, or a random stand-in of another seed); load it into the base "
            "model it was trained on."
        )
    layers = dict(lora_layers(model))
    if layers:
        settings = {(m.lora.rank, m.lora.alpha, m.lora.rslora) for m in layers.values()}
        if settings != {(config["rank"], config["alpha"], config["rslora"])} or set(layers) != set(
            config["targets"]
        ):
            raise ValueError(
                f"The model already carries LoRA layers with other settings than the adapter "
                f"(rank {config['rank']}, alpha {config['alpha']:g}, {len(config['targets'])} "
                "layers); load the adapter into a fresh base model."
            )
    weights = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{weights} cannot be read ({error}); it is missing or damaged: save the adapter "
            "again with lora_helpers.adapters.save_adapter."
        ) from None
    with undone_on_error(model):  # all or nothing
        if not layers:
            if _head(model).out_features != config["n_classes"]:
                to_classifier(model, config["n_classes"])
            replace_linear_with_lora(
                model, config["rank"], config["alpha"], config["targets"], rslora=config["rslora"]
            )
            mark_only_lora_as_trainable(model)
        own = _head_parameters(model)
        head = {k: v for k, v in tensors.items() if ".lora." not in k}
        if set(head) != set(own):
            raise ValueError(
                f"The adapter's head tensors {sorted(head)} are not this model's head "
                f"{sorted(own)} (missing {sorted(set(own) - set(head))}, not a head "
                f"{sorted(set(head) - set(own))}); load it into the base model it was "
                "trained on, or save it again with save_adapter."
            )
        misfits = [k for k, v in head.items() if own[k].shape != v.shape]
        if misfits:
            raise ValueError(
                f"The adapter's head tensors {misfits[:3]} do not fit the model's head; "
                "load it into the base model it was trained on."
            )
        # checks every LoRA key and shape before it copies any
        load_lora_state_dict(model, {k: v for k, v in tensors.items() if ".lora." in k})
        with torch.no_grad():
            for key, value in head.items():
                own[key].copy_(value)
    return model


@torch.no_grad()
def forward_latency(model: nn.Module, ids: torch.Tensor, repeats: int = 10) -> float:
    """Median seconds of one forward pass of `model` on `ids` (batch, tokens), after a warm-up.

    Measured in eval mode; the model's modes are restored afterwards. Raises ValueError for
    repeats below 1.
    """
    positive_int("repeats", repeats)
    device = next(model.parameters()).device
    ids = ids.to(device)
    times = []
    with evaluating(model):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up caches and kernels
                times.append(time.perf_counter() - started)
    return statistics.median(times)
