"""PEFT's LoRA format, both ways: our GPT-2 adapters into transformers + PEFT, and back.

PEFT (huggingface/peft) saves a LoRA adapter as a folder with adapter_model.safetensors and
adapter_config.json. For transformers' GPT-2 its tensors are named

    base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight    (r, in)
    base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight    (out, r)

and its layer adds scaling * x @ lora_A.weight^T @ lora_B.weight^T, scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), per module from rank_pattern and alpha_pattern where
they name it. Our LoRALayer adds scaling * x @ A @ B: A is lora_A.weight^T, B is lora_B.weight^T.
transformers' GPT-2 keeps its projections as Conv1D (weight (in, out)); fan_in_fan_out=True
says so, and PEFT uses it only to transpose a merged update (it sets it itself, with a
warning, for Conv1D), so the stored tensors have these shapes either way.

Our layers and transformers' modules, in block i (load_gpt2_safetensors maps the weights):

    att.W_query, att.W_key, att.W_value  ->  attn.c_attn  (one Conv1D: outputs [Q | K | V])
    att.out_proj                         ->  attn.c_proj
    ff.layers.0, ff.layers.2             ->  mlp.c_fc, mlp.c_proj

The fused c_attn, exactly, both ways. Out: Q, K and V adapters of ranks r_q, r_k, r_v become
one adapter of rank r_q + r_k + r_v, A stacked and B block-diagonal (zero where a projection
has none); when their scalings differ, each is folded into its block of B and the module's
scaling is 1. Q, K and V that share one A (as loaded from PEFT) go out as that one adapter.
In: Q, K and V each get the shared A and their slice of B, of the same rank r; rank
components whose slice of B is all zero are left out (they add nothing), so a block-diagonal
adapter comes back as the separate adapters it was made of, and a projection whose slice is
all zero gets none (unless all are: a fresh adapter keeps every projection).

The classifier head (to_classifier, notebook 05) goes to GPT2ForSequenceClassification's
`score` (task_type SEQ_CLS, modules_to_save). `score` has no bias; our head's bias b moves
into the bias of ln_f, the LayerNorm right before it: beta + delta with W delta = b
(delta = pinv(W) b), so W ln_f(h) equals our head's W ln_f(h) + b, to float rounding. PEFT
saves that ln_f as a module to save; reading it back gives the bias W (beta' - beta) again.

Padding and the token read. classify_logits(model, ids) reads the last position, padding
included: notebook 05 right-pads with <|endoftext|> (data.PAD_ID) and trains and evaluates
so. GPT2ForSequenceClassification reads the rightmost token that is not config.pad_token_id,
or the last position when pad_token_id is None (then one row per call). The same logits:
  - as notebook 05 reads them: pad_token_id = None, rows one at a time, padding kept and no
    attention_mask (our model attends to the padding too);
  - classify_logits(model, ids, lengths): pad_token_id = PAD_ID, in batches, with or without
    attention_mask (the same token when no message ends in <|endoftext|> itself).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from torch import nn

from .assets import writable_folder, write_atomically
from .checks import positive_int
from .gpt2 import GPTModel, gpt2_state_dict, to_classifier
from .lora import (
    LinearWithLoRA,
    is_adapter,
    load_lora_state_dict,
    lora_layers,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
    undone_on_error,
)
from .quant import QuantizedLinear, QuantizedLinearWithLoRA

if TYPE_CHECKING:
    import transformers

PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"

#: transformers' module in block i -> our layers in trf_blocks[i], in the order of its outputs.
_MODULES = {
    "attn.c_attn": ("att.W_query", "att.W_key", "att.W_value"),
    "attn.c_proj": ("att.out_proj",),
    "mlp.c_fc": ("ff.layers.0",),
    "mlp.c_proj": ("ff.layers.2",),
}

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"base_model\.model\.(?P<module>(?:transformer\.)?h\.(?P<block>\d+)\."
    r"(?P<kind>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj))\.lora_(?P<part>[AB])\.weight"
)
_HEAD_KEYS = {
    "score.weight": f"{_PREFIX}score.weight",
    "ln_f.weight": f"{_PREFIX}transformer.ln_f.weight",
    "ln_f.bias": f"{_PREFIX}transformer.ln_f.bias",
}

# LoraConfig options that do not change what a LoRA layer computes: bookkeeping, which modules
# (the file's keys say), how A and B were initialised or trained. Every other option must be
# off (None, False or empty): use_dora (DoRA), lora_bias (a bias on lora_B), bias (trained base
# biases), layer_replication, trainable_token_indices, target_parameters and PEFT's LoRA
# variants (aLoRA, QALoRA, BD-LoRA, Arrow, KaSA, MonteCLoRA, VeLoRA, Megatron layers).
_HARMLESS = set(
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision "
    "inference_mode r lora_alpha rank_pattern alpha_pattern use_rslora target_modules "
    "exclude_modules layers_to_transform layers_pattern modules_to_save fan_in_fan_out "
    "bias lora_dropout init_lora_weights loftq_config eva_config corda_config "
    "lora_ga_config qalora_group_size megatron_core runtime_config ensure_weight_tying ".split()
)
# init_lora_weights that leave the base weights as they are (PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA change them, so their adapters fit only the changed base; MiCA is a LoRA variant).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _rank_factor(rank: int, rslora: bool) -> float:
    """What alpha is divided by: rank, or sqrt(rank) with rsLoRA."""
    return math.sqrt(rank) if rslora else rank


# --------------------------------------------------------------------------------- export


def _refuse_meta(model: nn.Module) -> None:
    """ValueError when `model` has parameters on the meta device (shapes without values)."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "The model is on the meta device: it has shapes but no values to export or to load "
            "into; build it on a real device first (model.to_empty(device='cpu'), then load its "
            "weights)."
        )


def _exportable_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The model's LoRA layers, after refusing what PEFT's GPT-2 format cannot hold exactly."""
    if not isinstance(model, GPTModel):
        raise TypeError(
            f"export_peft_adapter maps a lora_helpers.gpt2.GPTModel onto transformers' GPT-2, got "
            f"{type(model).__name__}; export the adapter of a GPTModel."
        )
    _refuse_meta(model)
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedLinearWithLoRA)):
            raise ValueError(
                f"Layer {name!r} is quantised: PEFT's file holds A and B for a full-precision "
                "base, and LoRA trained on a 4-bit base fits that base only; export an adapter "
                "trained on the full-precision model."
            )
        if is_adapter(module) and not isinstance(module, LinearWithLoRA):
            raise ValueError(
                f"Layer {name!r} is a {type(module).__name__}, not LoRA: this export writes plain "
                "LoRA only (DoRA's magnitudes have no place in it); export a LoRA model."
            )
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError(
            "The model has no LoRA layers to export; add them with replace_linear_with_lora first."
        )
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"The LoRA layer {merged[0]!r} is merged into its weight, so A and B no longer say "
            "what the base was; call unmerge_lora(model) first."
        )
    inside = {
        f"trf_blocks.{i}.{part}"
        for i in range(len(model.trf_blocks))
        for parts in _MODULES.values()
        for part in parts
    }
    outside = [name for name in layers if name not in inside]
    if outside:
        raise ValueError(
            f"LoRA on {outside[0]!r} is outside the transformer blocks: GPT-2's LM head is "
            "tied to the token embedding (PEFT would save the whole embedding with it) and a "
            "classifier's head is saved whole; put LoRA on the blocks only, "
            "replace_linear_with_lora(model.trf_blocks, ...)."
        )
    return layers


def _fuse(linears: list[nn.Module], rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One PEFT adapter for these layers side by side: lora_A (r, in), lora_B (out, r), r, alpha."""
    loras = [m.lora for m in linears if isinstance(m, LinearWithLoRA)]
    outs = [
        m.linear.out_features if isinstance(m, LinearWithLoRA) else m.out_features for m in linears
    ]
    first = loras[0]
    shared = all(
        lo.A.shape == first.A.shape and torch.equal(lo.A, first.A) and lo.scaling == first.scaling
        for lo in loras
    )
    if shared:  # one A (one layer, or Q, K, V as loaded from PEFT): the B's side by side
        rank, factors = first.rank, [1.0] * len(loras)
        alpha = (
            first.alpha if first.rslora == rslora else first.scaling * _rank_factor(rank, rslora)
        )
        lora_A = first.A.T
    else:  # block-diagonal, each scaling folded into its block when they differ
        rank = sum(lo.rank for lo in loras)
        same = len({lo.scaling for lo in loras}) == 1
        factors = [1.0 if same else lo.scaling for lo in loras]
        alpha = (first.scaling if same else 1.0) * _rank_factor(rank, rslora)
        lora_A = torch.cat([lo.A.T for lo in loras])
    lora_B = first.B.new_zeros(sum(outs), rank)
    row = column = 0
    lora_iter = iter(zip(loras, factors, strict=True))
    for module, out in zip(linears, outs, strict=True):
        if isinstance(module, LinearWithLoRA):
            lora, factor = next(lora_iter)
            width = rank if shared else lora.rank
            lora_B[row : row + out, column : column + width] = factor * lora.B.T
            column += 0 if shared else width
        row += out
    return lora_A, lora_B, rank, alpha


def _head_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """score (and ln_f, carrying the head's bias) for a classifier head; nothing for the LM head."""
    head = model.out_head
    if head.weight is model.tok_emb.weight:
        return {}
    if head.out_features == model.tok_emb.num_embeddings:
        raise ValueError(
            "The LM head is not tied to the token embedding (transformers' GPT2LMHeadModel ties "
            "them); tie it again, model.out_head.weight = model.tok_emb.weight, or use "
            "to_classifier for a classifier."
        )
    tensors = {"score.weight": head.weight}
    if head.bias is None or not head.bias.any():
        return tensors
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    norm = model.final_norm
    delta = torch.linalg.pinv(weight) @ bias
    new_bias = (norm.bias.detach().double() + delta).to(norm.bias.dtype)
    off = (weight @ (new_bias.double() - norm.bias.double()) - bias).abs().max().item()
    if off > 1e-5:
        raise ValueError(
            f"The head's bias cannot be carried exactly: GPT2ForSequenceClassification's score "
            f"has no bias, and moving it into ln_f's bias misses by {off:.1e} because the "
            "head's rows are (nearly) linearly dependent; train the head again or drop its bias."
        )
    return {**tensors, "ln_f.weight": norm.weight, "ln_f.bias": new_bias}


def export_peft_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the LoRA adapter (and classifier head) of `model` in PEFT's format; returns the folder.

    `model`: a GPTModel with LoRA (LinearWithLoRA) on any of its block linears, each of its
    own rank, alpha and rule (alpha/r or rsLoRA). The folder gets adapter_model.safetensors
    and adapter_config.json; PeftModel.from_pretrained(base, folder), with `base`
    transformers' GPT2LMHeadModel holding the same base weights (GPT2ForSequenceClassification
    for a classifier), then computes the same logits (see the module docstring for how Q, K,
    V, the head's bias and padding map). Ranks and alphas that differ between modules go to
    rank_pattern and alpha_pattern; use_rslora is set when every layer uses it.

    Raises TypeError for a model that is not a GPTModel, and ValueError, writing nothing,
    for what has no exact place in the format: no LoRA, merged LoRA, DoRA, a quantised base,
    LoRA outside the blocks (the head), an untied LM head, a head bias that cannot be moved.
    """
    layers = _exportable_layers(model)
    rslora = all(layer.lora.rslora for layer in layers.values())
    head = _head_tensors(model)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, int, float]] = {}
    for i, block in enumerate(model.trf_blocks):
        for kind, parts in _MODULES.items():
            linears = [block.get_submodule(part) for part in parts]
            if any(isinstance(m, LinearWithLoRA) for m in linears):
                modules[f"h.{i}.{kind}"] = _fuse(linears, rslora)
    rank = Counter(r for _, _, r, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, _, _, a in modules.values()).most_common(1)[0][0]
    n_blocks = len(model.trf_blocks)
    targets = []
    for kind in _MODULES:
        names = [f"h.{i}.{kind}" for i in range(n_blocks) if f"h.{i}.{kind}" in modules]
        targets += [kind] if len(names) == n_blocks else names
    dropouts = {
        layer.lora.dropout.p if isinstance(layer.lora.dropout, nn.Dropout) else 0.0
        for layer in layers.values()
    }
    if len(dropouts) > 1:
        warnings.warn(
            f"The LoRA layers use dropouts {sorted(dropouts)}; PEFT's lora_dropout is one number, "
            f"so {max(dropouts)} is written (dropout acts only in training).",
            stacklevel=2,
        )
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if head else "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {name: r for name, (_, _, r, _) in modules.items() if r != rank},
        "alpha_pattern": {name: a for name, (_, _, _, a) in modules.items() if a != alpha},
        "use_rslora": rslora,
        "target_modules": targets,
        "fan_in_fan_out": True,  # transformers' GPT-2 uses Conv1D
        "bias": "none",
        "lora_dropout": max(dropouts),
        "use_dora": False,
        "modules_to_save": [m for m in ("score", "ln_f") if f"{m}.weight" in head] or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, (lora_A, lora_B, _, _) in modules.items():
        tensors[f"{_PREFIX}transformer.{name}.lora_A.weight"] = lora_A
        tensors[f"{_PREFIX}transformer.{name}.lora_B.weight"] = lora_B
    for name, tensor in head.items():
        tensors[_HEAD_KEYS[name]] = tensor
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    directory = writable_folder(directory, "directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / PEFT_WEIGHTS_FILE, save(tensors))  # each file whole or not at all
    write_atomically(directory / PEFT_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


# ----------------------------------------------------------------------------------- load


def _read_peft_config(directory: str | Path) -> dict:
    """The adapter_config.json of a PEFT LoRA adapter, after refusing what this loader cannot map.

    Raises FileNotFoundError without the file, ValueError for another PEFT type or a LoRA
    option that changes what the adapter computes (DoRA, a bias, PEFT's LoRA variants, an
    initialisation that changed the base weights).
    """
    path = Path(directory) / PEFT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {PEFT_CONFIG_FILE} in {directory}; pass the folder that PEFT's save_pretrained "
            "(or export_peft_adapter) wrote."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); save the adapter again with PEFT's save_pretrained."
        ) from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} holds a {type(config).__name__}, not PEFT's settings object; save the adapter again."
        )
    if config.get("peft_type") != "LORA":
        kind = (
            f"a PEFT {config['peft_type']!r} adapter"
            if "peft_type" in config
            else "without a peft_type"
        )
        raise ValueError(
            f"{path} is {kind}, not LoRA; load_peft_adapter reads PEFT LoRA adapters only."
        )
    _check_numbers(config, path)
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"The adapter was trained with bias={config['bias']!r}, so it changes base biases "
            "too; only bias='none' maps onto our LoRA layers."
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"init_lora_weights={init!r} changes the base weights or the layer (PiSSA, OLoRA, "
            "CorDA, LoftQ, LoRA-GA, MiCA), so the adapter fits only that base; convert it "
            "with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)."
        )
    for key, value in config.items():
        if key not in _HARMLESS and value not in (None, False, [], {}, ""):
            raise ValueError(
                f"The adapter sets {key}={value!r}, a PEFT option that changes what its layers "
                "compute (or one this loader does not know); only plain LoRA maps onto "
                "LinearWithLoRA, so train the adapter without it."
            )
    return config


def _check_numbers(config: dict, path: Path) -> None:
    """ValueError naming the setting when r, lora_alpha, their patterns or lora_dropout are not
    numbers PEFT could have written (a positive whole rank, a finite alpha, dropout in [0, 1))."""

    def rank_ok(r) -> bool:
        return isinstance(r, int | float) and not isinstance(r, bool) and r == int(r) and r >= 1

    def alpha_ok(a) -> bool:
        return isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a)

    checks = [
        ("r", config.get("r", 8), rank_ok),
        ("lora_alpha", config.get("lora_alpha", 8), alpha_ok),
    ]
    for name, ok in (("rank_pattern", rank_ok), ("alpha_pattern", alpha_ok)):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise ValueError(
                f"{name} in {path} must map module names to numbers, got {patterns!r}."
            )
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(
                    f"{name} in {path} has the key {key!r}, not a valid pattern ({err})."
                ) from err
            checks.append((f"{name}[{key!r}]", value, ok))
    for name, value, ok in checks:
        if not ok(value):
            raise ValueError(
                f"{name} in {path} is {value!r}; PEFT writes a positive whole number for a rank "
                "and a finite number for alpha: save the adapter again."
            )
    dropout = config.get("lora_dropout") or 0.0
    if not alpha_ok(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout in {path} is {dropout!r}; it must be a number in [0, 1).")


def _pattern(patterns: dict, name: str, default):
    """The value for module `name` from rank_pattern / alpha_pattern, matched as PEFT does
    (peft.utils.other.get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name))."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _not_mappable(key: str) -> str:
    return (
        f"The adapter holds {key!r}, which is neither LoRA on one of GPT-2's block projections "
        f"({', '.join(_MODULES)}) nor the classifier head 'score': it was made for another "
        "architecture or with other targets (lm_head, wte, modules_to_save), which have no "
        "place in a GPTModel's adapter; train it with target_modules among those four."
    )


def _plan(
    model: GPTModel, config: dict, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, int, float]], tuple | None]:
    """Check every tensor against `model`; returns {our layer: (A (in, r), B (r, out), r, alpha)}
    and the head as (weight (n_classes, emb), bias (n_classes,)), or None."""
    emb, n_blocks = model.tok_emb.embedding_dim, len(model.trf_blocks)
    shapes = {  # (in, out) of each module
        "attn.c_attn": (emb, 3 * emb),
        "attn.c_proj": (emb, emb),
        "mlp.c_fc": (emb, 4 * emb),
        "mlp.c_proj": (4 * emb, emb),
    }
    found: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, tuple[int, str]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            if key not in _HEAD_KEYS.values():
                raise ValueError(_not_mappable(key))
            continue
        block, kind = int(match["block"]), match["kind"]
        if block >= n_blocks:
            raise ValueError(
                f"The adapter has LoRA in block {block}, but this model has {n_blocks} blocks: "
                "it was made for another GPT-2 size; load it into that size."
            )
        found.setdefault(match["module"], {})[match["part"]] = tensor
        kinds[match["module"]] = (block, kind)
    if not found:
        raise ValueError(
            "The adapter holds no LoRA tensors of GPT-2's blocks; pass a PEFT LoRA adapter "
            "trained on transformers' GPT-2."
        )
    rslora = bool(config.get("use_rslora", False))
    plan = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{module} lacks its lora_A or lora_B tensor; save the adapter again.")
        (block, kind), (d_in, d_out) = kinds[module], shapes[kinds[module][1]]
        lora_A, lora_B = parts["A"], parts["B"]
        rank = lora_A.shape[0]
        if lora_A.shape != (rank, d_in) or lora_B.shape != (d_out, rank):
            raise ValueError(
                f"{module} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, but "
                f"this model ({emb}-dim) needs (r, {d_in}) and ({d_out}, r): the adapter was made "
                "for another GPT-2 size; load it into that size."
            )
        said = _pattern(config.get("rank_pattern") or {}, module, config.get("r", 8))
        if int(said) != rank:
            raise ValueError(
                f"The config gives {module} rank {said} but its tensors have rank {rank}, so "
                "its scaling is unclear; save the adapter again with PEFT."
            )
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scaling = alpha / _rank_factor(rank, rslora)
        parts_out = _MODULES[kind]
        pieces = lora_B.split(d_out // len(parts_out))
        keeps = [piece.ne(0).any(dim=0) for piece in pieces]  # rank components each one uses
        if len(parts_out) == 1 or not any(keep.any() for keep in keeps):  # (fresh: B = 0)
            keeps = [torch.ones(rank, dtype=torch.bool)] * len(parts_out)
        for part, piece, keep in zip(parts_out, pieces, keeps, strict=True):
            r = int(keep.sum())
            if r:
                own_alpha = alpha if r == rank else scaling * _rank_factor(r, rslora)
                plan[f"trf_blocks.{block}.{part}"] = (
                    lora_A[keep].T,
                    piece[:, keep].T,
                    r,
                    own_alpha,
                )
    return plan, _head_from(model, tensors)


def _head_from(model: GPTModel, tensors: dict[str, torch.Tensor]) -> tuple | None:
    """(weight, bias) of the classifier head in the file, or None; the bias comes from a saved
    ln_f that differs from the model's only in its bias (what export_peft_adapter writes)."""
    score = tensors.get(_HEAD_KEYS["score.weight"])
    norm = {
        k: tensors[_HEAD_KEYS[k]] for k in ("ln_f.weight", "ln_f.bias") if _HEAD_KEYS[k] in tensors
    }
    if score is None:
        if norm:
            raise ValueError(_not_mappable(_HEAD_KEYS["ln_f.weight"]))
        return None
    emb = model.tok_emb.embedding_dim
    if score.dim() != 2 or score.shape[1] != emb:
        raise ValueError(
            f"The head 'score' has shape {tuple(score.shape)}, but this model needs "
            f"(n_classes, {emb}): the adapter was made for another GPT-2 size."
        )
    bias = torch.zeros(score.shape[0], dtype=torch.float64)
    if norm:
        ours = model.final_norm
        if set(norm) != {"ln_f.weight", "ln_f.bias"} or not torch.allclose(
            norm["ln_f.weight"].double(),
            ours.weight.detach().double().cpu(),
            rtol=torch.finfo(norm["ln_f.weight"].dtype).eps,
            atol=0,
        ):
            raise ValueError(
                "The adapter saves a trained final LayerNorm (ln_f) with other weights than this "
                "model's; only a changed ln_f bias maps (onto the head's bias), so train the "
                "adapter without ln_f in modules_to_save, or load it into its own base."
            )
        shift = norm["ln_f.bias"].double() - ours.bias.detach().double().cpu()
        bias = score.double() @ shift
    return score, bias


def load_peft_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter of transformers' GPT-2 into `model`, in place; returns `model`.

    `model`: a GPTModel without adapters, holding the base weights the adapter was trained on
    (load_gpt2_safetensors of the same checkpoint). Targets may be any of attn.c_attn,
    attn.c_proj, mlp.c_fc, mlp.c_proj, with rank_pattern, alpha_pattern and use_rslora; each
    becomes LinearWithLoRA layers of the same scaling (see the module docstring for c_attn).
    A classifier head 'score' (task_type SEQ_CLS) replaces out_head (to_classifier), its bias
    zero unless a saved ln_f carries it. Afterwards only LoRA is trainable, as after load_adapter.

    Raises TypeError for a model that is not a GPTModel, FileNotFoundError without the files,
    and ValueError, leaving the model exactly as it was, for an adapter that does not map:
    another architecture or size, another PEFT type, DoRA or another LoRA variant, other
    targets, bias != "none", modules to save other than the head, a model with adapters or on
    the meta device, a damaged file (invalid JSON or safetensors, a rank or alpha that is not
    a number, NaN or infinite values).
    """
    if not isinstance(model, GPTModel):
        raise TypeError(
            f"load_peft_adapter loads into a lora_helpers.gpt2.GPTModel, got {type(model).__name__}."
        )
    _refuse_meta(model)
    taken = [n for n, m in model.named_modules() if is_adapter(m) or isinstance(m, QuantizedLinear)]
    if taken:
        raise ValueError(
            f"The model already carries adapters or quantised layers (e.g. {taken[0]!r}); load the "
            "PEFT adapter into a fresh base model."
        )
    config = _read_peft_config(directory)
    weights = Path(directory) / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"No {PEFT_WEIGHTS_FILE} in {directory}; save the adapter with PEFT's "
            "save_pretrained (safe_serialization=True, the default)."
        )
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(
            f"{weights} cannot be read as safetensors ({err}); save the adapter again."
        ) from err
    broken = [key for key, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:
        raise ValueError(
            f"{weights} holds NaN or infinite values in {broken[0]!r}"
            f"{f' (and {len(broken) - 1} more)' if len(broken) > 1 else ''}: the adapter is broken."
        )
    plan, head = _plan(model, config, tensors)
    dropout = float(config.get("lora_dropout") or 0.0)
    with undone_on_error(model):  # all or nothing
        if head is not None and (
            model.out_head.weight is model.tok_emb.weight
            or model.out_head.out_features != head[0].shape[0]
            or model.out_head.bias is None
        ):
            to_classifier(model, head[0].shape[0])
        groups: dict[tuple[int, float], list[str]] = {}
        for name, (_, _, rank, alpha) in plan.items():
            groups.setdefault((rank, alpha), []).append(name)
        rslora = bool(config.get("use_rslora", False))
        for (rank, alpha), names in groups.items():
            replace_linear_with_lora(model, rank, alpha, names, dropout=dropout, rslora=rslora)
        load_lora_state_dict(
            model,
            {
                f"{n}.lora.{ab}": t
                for n, (A, B, _, _) in plan.items()
                for ab, t in (("A", A), ("B", B))
            },
        )
        mark_only_lora_as_trainable(model)
        if head is not None:
            with torch.no_grad():
                model.out_head.weight.copy_(head[0])
                model.out_head.bias.copy_(head[1])
    return model


# ------------------------------------------------------------------------ transformers


def transformers_config(cfg: dict, **extra) -> transformers.GPT2Config:
    """transformers' GPT2Config for one of our GPTModel configs (gpt2_config, FALLBACK_CONFIG):
    the same sizes, dropout and LayerNorm epsilon; <|endoftext|> (the last token) as BOS and
    EOS; `extra` settings replace or add to these."""
    import transformers

    settings = {
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": cfg["vocab_size"] - 1,
        "eos_token_id": cfg["vocab_size"] - 1,
    }
    return transformers.GPT2Config(**(settings | extra))


def to_transformers(model: GPTModel, n_classes: int | None = None) -> nn.Module:
    """transformers' GPT-2 holding `model`'s base weights, in its dtype and eval mode, on the CPU.

    GPT2LMHeadModel, or with `n_classes` GPT2ForSequenceClassification whose `score` stays
    random until an adapter (export_peft_adapter) brings the trained head. Its config has
    pad_token_id None, so it reads the last position, padding included, as notebook 05's
    classify_logits(model, ids) does (module docstring); feed it one row at a time.
    This is the base PeftModel.from_pretrained needs for an adapter of `model`.

    Raises TypeError for a model that is not a GPTModel and ValueError for an n_classes
    that is neither None nor a positive int, or a model on the meta device or whose block
    layers carry adapters or 4 bits (see gpt2_state_dict).
    """
    import transformers  # a core dependency, imported here so that the module loads fast

    if not isinstance(model, GPTModel):
        raise TypeError(
            f"to_transformers takes a lora_helpers.gpt2.GPTModel, got {type(model).__name__}."
        )
    if n_classes is not None:
        positive_int("n_classes", n_classes, "or None for the language-model head")
    _refuse_meta(model)
    state = gpt2_state_dict(model)
    config = transformers_config(model.cfg, num_labels=n_classes or 2, pad_token_id=None)
    kind = (
        transformers.GPT2LMHeadModel
        if n_classes is None
        else transformers.GPT2ForSequenceClassification
    )
    theirs = kind(config)
    missing, unexpected = theirs.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:  # a transformers version with other names
        raise ValueError(
            f"transformers' GPT-2 did not take these weights (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); this transformers version names them differently."
        )
    return theirs.to(model.tok_emb.weight.dtype).eval()
