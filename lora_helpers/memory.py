"""The memory one training step holds, part by part, counted from a model's shapes.

A step holds, in the usual accounting (Rajbhandari et al., 2019, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", arXiv:1910.02054, section 3.1):

- weights: every parameter and buffer, in the dtype the forward pass reads;
- in mixed precision, a float32 master copy of each trained weight;
- a gradient for each trained number;
- AdamW's two states (exp_avg and exp_avg_sq) for each trained number, float32;
- activations: what autograd keeps from the forward pass for the backward pass.

Bytes per number (`per_number`), by mode and precision:

    full   float32   weight 4, gradient 4, AdamW 8                              16
    full   bf16      weight 2, float32 master 4, gradient 2, AdamW 8            16 (ZeRO's 2 + 2 + 12)
    lora   float32   frozen 4; adapters 4 + 4 + 8
    lora   bf16      frozen 2; adapters float32, 4 + 4 + 8 (PEFT's get_peft_model upcasts
                     bf16 adapters to float32: autocast_adapter_dtype=True by default)
    qlora  bf16      the blocks' linear weights in NF4: 4 bits plus NF4_CONSTANT_BITS (QLoRA,
                     Dettmers et al., 2023, arXiv:2305.14314, section 3: blocks of 64, double
                     quantization); embeddings, norms, biases and the LM head bf16 (transformers'
                     bitsandbytes loader leaves the output embedding unquantised by default);
                     adapters as for LoRA

Activations are measured, not estimated: `activation_bytes` runs one forward pass and the loss
of the real architecture (our GPTModel for GPT-2, transformers' LlamaForCausalLM for the 7B
shape) on PyTorch's meta device, which allocates nothing, and sums the tensors autograd saves
for backward, each storage once, the parameters left out. No gradient checkpointing. The sum
includes the loss's float32 log-probabilities, (batch, tokens, vocabulary) x 4 bytes.
`breakdowns` counts models of one and two blocks and extends the counts to the full depth:
the blocks are identical, so that gives the full model's bytes exactly, without running
dozens of blocks through the meta device's slow Python kernels.

Two things the meta device cannot do, and what is done instead:

- Attention. On the meta device PyTorch's scaled_dot_product_attention takes its unfused path,
  which keeps (tokens x tokens) attention weights. The fused kernels a GPU runs (flash
  attention), and a CPU when there is no dropout, keep q, k, v, the output and one float32
  log-sum-exp per row. With fused_attention=True a stand-in with exactly those saved tensors
  runs instead; the tests check it against the CPU's fused kernel.
- Masks. transformers reads the position ids to decide whether a batch needs an attention mask;
  a meta tensor has no values. A batch without padding needs none (SDPA's is_causal does the
  masking), so on the meta device none is built; the tests check this against a CPU run.

Otherwise the meta device's shapes and dtypes are those of a GPU's kernels (for bf16 input,
LayerNorm keeps its mean and 1/std in float32, as on a GPU; a CPU keeps them in bf16).

QLoRA's activations are LoRA's: bitsandbytes' 4-bit matmul (MatMul4Bit) keeps only its packed
weight for backward and dequantises it again there, so what is kept is what the adapters and
the rest of the block keep. The model measured is LoRA's on the bf16 base.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from .bench import lm_loss
from .checks import positive_int
from .claims import LLAMA_2_7B
from .gpt2 import GPTModel, gpt2_config
from .lora import RankWarning, lora_layers, mark_only_lora_as_trainable, replace_linear_with_lora
from .protocol import format_table

SIZES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b")
MODES = ("full", "lora", "qlora")
PRECISIONS = ("float32", "bf16")
#: (mode, precision) pairs notebook 09 compares.
SCHEMES = (("full", "float32"), ("full", "bf16"), ("lora", "bf16"), ("qlora", "bf16"))
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
#: QLoRA's quantisation constants per weight (section 3): one 8-bit constant per block of 64
#: weights, and one float32 constant per 256 of those; without double quantization, 32 / 64.
NF4_CONSTANT_BITS = 8 / 64 + 32 / (64 * 256)
#: The "typical results" table of a popular article, GB for a 7B model (it calls the table
#: hypothetical): full fine-tuning "40 GB or more", LoRA 12 GB, QLoRA 8 GB.
ARTICLE_GB = {"full": 40.0, "lora": 12.0, "qlora": 8.0}


class PerNumber(NamedTuple):
    """Bytes one number of the model costs, by part."""

    weight: float
    master: int = 0
    gradient: int = 0
    adamw: int = 0


class Memory(NamedTuple):
    """Bytes a training step holds, by part (see the module)."""

    weights: float
    master: float
    gradients: float
    adamw: float
    activations: int

    @property
    def model_states(self) -> float:
        """Weights, master copy, gradients and AdamW states: what the batch does not change."""
        return self.weights + self.master + self.gradients + self.adamw

    @property
    def total(self) -> float:
        """All five parts, bytes."""
        return self.model_states + self.activations


def _check(size: str | None, mode: str, precision: str) -> None:
    if size is not None and size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; use one of {list(SIZES)}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; use one of {list(MODES)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; use one of {list(PRECISIONS)}.")
    if mode == "qlora" and precision != "bf16":
        raise ValueError("QLoRA computes in bf16 on its 4-bit base: use precision='bf16'.")


def _a_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"Expected a model, got {model!r}; build one with memory.build(size, mode, precision)."
        )
    return model


def per_number(mode: str, precision: str, kind: str) -> PerNumber:
    """Bytes one number costs in `mode` and `precision` (the table in the module).

    kind: "trained", "frozen", or "quantized" (QLoRA's block linear weights).
    Raises ValueError for an unknown mode, precision or kind, QLoRA in float32, or a
    quantized number outside QLoRA.
    """
    _check(None, mode, precision)
    if kind == "trained":
        if mode == "full" and precision == "bf16":
            return PerNumber(weight=2, master=4, gradient=2, adamw=8)
        return PerNumber(weight=4, gradient=4, adamw=8)  # float32 (LoRA's adapters always)
    if kind == "frozen":
        return PerNumber(weight=DTYPES[precision].itemsize)
    if kind == "quantized" and mode == "qlora":
        return PerNumber(weight=(4 + NF4_CONSTANT_BITS) / 8)
    raise ValueError(
        f"Unknown kind {kind!r} for mode {mode!r}; use 'trained' or 'frozen' "
        "(and 'quantized' with mode='qlora')."
    )


def _llama_7b(n_blocks: int) -> nn.Module:
    import transformers  # imported when asked for: it takes seconds

    shape = {**LLAMA_2_7B, "num_hidden_layers": n_blocks}
    config = transformers.LlamaConfig(**shape, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def depth(size: str) -> int:
    """The number of blocks of `size` (SIZES): 12 for gpt2-small, 32 for llama-2-7b.
    Raises ValueError for an unknown size."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; use one of {list(SIZES)}.")
    if size == "llama-2-7b":
        return LLAMA_2_7B["num_hidden_layers"]
    return gpt2_config(size)["n_layers"]


def blocks(model: nn.Module) -> nn.Module:
    """The repeated blocks of a GPTModel (trf_blocks) or a transformers Llama (model.layers)."""
    return model.trf_blocks if isinstance(model, GPTModel) else model.model.layers


def build(
    size: str,
    mode: str,
    precision: str,
    rank: int = 16,
    alpha: float = 16,
    *,
    n_blocks: int | None = None,
) -> nn.Module:
    """The model of `size` (SIZES) on the meta device: no memory used, nothing downloaded.

    Its weights are in the precision's dtype (float32 or bfloat16); for "lora" and "qlora",
    LinearWithLoRA of `rank` and `alpha` wraps every linear layer of the blocks (its adapters
    are float32 on a bf16 base, lora.adapter_dtype) and only the adapters train. QLoRA's model
    is LoRA's: the 4-bit storage is accounted for by model_states. Train mode (dropout on).
    n_blocks: build only the first n_blocks blocks (breakdowns builds 1 and 2); all
    depth(size) of them by default.
    Raises ValueError for an unknown size, mode or precision, QLoRA in float32, or an
    n_blocks that is not an integer from 1 to depth(size).
    """
    _check(size, mode, precision)
    blocks_of_size = depth(size)
    if n_blocks is None:
        n_blocks = blocks_of_size
    elif positive_int("n_blocks", n_blocks, "e.g. n_blocks=2") > blocks_of_size:
        raise ValueError(
            f"n_blocks must be from 1 to {blocks_of_size} (the blocks of {size}), got "
            f"{n_blocks!r}; leave it out for the whole model."
        )
    with torch.device("meta"):
        if size == "llama-2-7b":
            model = _llama_7b(n_blocks)
        else:
            model = GPTModel({**gpt2_config(size), "n_layers": n_blocks})
    model.to(DTYPES[precision])
    if mode != "full":
        replace_linear_with_lora(blocks(model), rank, alpha)
        mark_only_lora_as_trainable(model)
    return model.train()


def model_states(model: nn.Module, mode: str, precision: str) -> Memory:
    """Weights, master copy, gradients and AdamW states of `model` (from build), in bytes, by
    per_number for each parameter (shared ones once), plus its buffers as they are; the
    activations are 0. Under "qlora" the linear weights LoRA wraps count as NF4.
    Raises ValueError as per_number does, for something that is not a model, and when `mode`
    or `precision` does not match the model (LoRA layers present or not, the base's dtype).
    """
    _a_model(model)
    _check(None, mode, precision)
    has_lora = any(True for _ in lora_layers(model))
    if has_lora != (mode != "full"):
        raise ValueError(
            f"mode={mode!r} does not match the model ({'with' if has_lora else 'without'} LoRA "
            f"layers); build it with memory.build(size, {mode!r}, {precision!r})."
        )
    base = {p.dtype for p in model.parameters() if mode == "full" or not p.requires_grad}
    if base - {DTYPES[precision]}:
        raise ValueError(
            f"precision={precision!r} does not match the model's base weights "
            f"({sorted(str(d) for d in base)}); build it with memory.build(size, {mode!r}, "
            f"{precision!r}) or pass the precision it was built in."
        )
    quantized = {id(layer.linear.weight) for _, layer in lora_layers(model)}
    parts = [0.0, 0.0, 0.0, 0.0]
    for param in model.parameters():
        if param.requires_grad:
            kind = "trained"
        else:
            kind = "quantized" if mode == "qlora" and id(param) in quantized else "frozen"
        for i, cost in enumerate(per_number(mode, precision, kind)):
            parts[i] += param.numel() * cost
    parts[0] += sum(b.numel() * b.element_size() for b in model.buffers())
    return Memory(*parts, activations=0)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel returns and keeps for backward, without computing it:
    q, k, v, the output and a float32 log-sum-exp per (batch, head, query), as PyTorch's flash
    kernels (CUDA and CPU) do. q, k, v: (batch, heads, tokens, head_dim). The output is laid
    out as those kernels lay it out, (batch, tokens, heads, head_dim) in memory, so that
    merging the heads afterwards is a view, not a copy. For counting on the meta device only;
    never run backward."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, _ = query.shape
        out = query.new_empty(batch, tokens, heads, value.shape[-1]).transpose(1, 2)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """scaled_dot_product_attention's signature, for _FusedAttention. A fused kernel applies
    dropout and the causal mask inside, keeping nothing more; an explicit mask is refused."""
    if attn_mask is not None:
        raise ValueError("The fused-attention count does not model an explicit attention mask.")
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def _meta_forward(model: nn.Module, fused_attention: bool) -> Iterator[None]:
    """Inside, a forward pass of `model` runs on the meta device (see the module)."""
    with contextlib.ExitStack() as stack:
        if fused_attention:
            stack.enter_context(
                mock.patch.object(F, "scaled_dot_product_attention", _fused_attention)
            )
        if not isinstance(model, GPTModel):  # transformers: no mask for a batch without padding
            from transformers.models.llama import modeling_llama

            stack.enter_context(
                mock.patch.object(modeling_llama, "create_causal_mask", return_value=None)
            )
        yield


def _storage(tensor: torch.Tensor) -> int:
    """The identity of the memory under `tensor`: its storage's C++ object, since a meta tensor
    has no data pointer (every one is 0)."""
    return tensor.untyped_storage()._cdata


def activation_bytes(
    model: nn.Module, batch: int, tokens: int, *, fused_attention: bool = True
) -> int:
    """Bytes autograd saves for backward in one forward pass and loss (bench.lm_loss) of
    `model` on token ids of shape (batch, tokens), each storage once, parameters left out.

    On the meta device (see the module) attention is counted as a fused kernel keeps it, or,
    with fused_attention=False, as PyTorch's unfused path does; on a real device the real
    kernels run. Raises ValueError if `model` is not a model, or batch or tokens is not a
    whole number of at least 1.
    """
    _a_model(model)
    positive_int("batch", batch, "e.g. batch=8")
    positive_int("tokens", tokens, "e.g. tokens=8")
    params = {_storage(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if _storage(tensor) not in params:
            saved[_storage(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    device = next(model.parameters()).device
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    on_meta = _meta_forward(model, fused_attention) if device.type == "meta" else None
    with on_meta or contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            lm_loss(model, ids)
    return sum(saved.values())


def _warn_once_for_the_whole_model(caught: list[warnings.WarningMessage], size: str) -> None:
    """Warnings from building the 1- and 2-block models, once each; a RankWarning (whose layer
    count is the small models') once for the size."""
    seen = set()
    for warning in caught:
        if issubclass(warning.category, RankWarning):
            message = (
                f"the rank is larger than min(in, out) of some linear layers of {size}; their "
                "extra adapter parameters buy nothing, and are counted all the same."
            )
        else:
            message = str(warning.message)
        if (warning.category, message) not in seen:
            seen.add((warning.category, message))
            warnings.warn(message, warning.category, stacklevel=3)


def _to_depth(one: float, two: float, blocks: int) -> float:
    """A count made with 1 and with 2 blocks, extended to `blocks` identical blocks."""
    return one + (blocks - 1) * (two - one)


def breakdowns(
    sizes: Sequence[str] = SIZES,
    schemes: Sequence[tuple[str, str]] = SCHEMES,
    batches: Sequence[int] = (1, 8),
    tokens: int = 512,
    *,
    rank: int = 16,
    fused_attention: bool = True,
) -> dict[tuple[str, str, str], dict[int, Memory]]:
    """The bytes of a training step for every size and (mode, precision) scheme, at each batch
    of `tokens` tokens: {(size, mode, precision): {batch: Memory}}, the model_states and
    activation_bytes of build(size, mode, precision, rank, alpha=rank).

    Every block of a size is the same and keeps the same, so each count is the model's
    outside the blocks plus depth(size) times one block's: both are measured on models of 1
    and 2 blocks and extended to the full depth, which gives the same bytes as counting the
    full model (the tests check it) in a fraction of the time. QLoRA's model is LoRA's, so
    their activations are measured once. Raises ValueError as build and activation_bytes
    do, and for empty or malformed sizes, schemes or batches."""
    if isinstance(sizes, str) or not sizes:
        raise ValueError(f"sizes must be a non-empty list, got {sizes!r}; e.g. ['gpt2-small'].")
    given = batches  # as a tuple: a generator would be used up by the checks below
    if isinstance(batches, int) or not (batches := tuple(batches or ())):
        raise ValueError(f"batches must be a non-empty list, got {given!r}; e.g. (1, 8).")
    for b in batches:
        positive_int("batch", b, "e.g. batch=8")
    if not schemes or any(not isinstance(x, tuple) or len(x) != 2 for x in schemes):
        raise ValueError(
            f"schemes must be (mode, precision) pairs, got {schemes!r}; e.g. [('full', 'bf16')]."
        )
    results, models, measured = {}, {}, {}
    for size in sizes:
        for mode, precision in schemes:
            shape = (size, "lora" if mode == "qlora" else mode, precision)
            if shape not in models:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    models[shape] = [
                        build(size, mode, precision, rank, alpha=rank, n_blocks=n) for n in (1, 2)
                    ]
                _warn_once_for_the_whole_model(caught, size)
                measured[shape] = {
                    b: [
                        activation_bytes(m, b, tokens, fused_attention=fused_attention)
                        for m in models[shape]
                    ]
                    for b in batches
                }
            one, two = (model_states(m, mode, precision) for m in models[shape])
            states = Memory(*(_to_depth(x, y, depth(size)) for x, y in zip(one, two, strict=True)))
            results[size, mode, precision] = {
                b: states._replace(activations=int(_to_depth(*measured[shape][b], depth(size))))
                for b in batches
            }
    return results


def format_breakdowns(results: dict[tuple[str, str, str], dict[int, Memory]], tokens: int) -> str:
    """A text table of breakdowns() (made with `tokens` tokens a sequence): GB (1e9 bytes) per
    part, and the activations and total at each batch."""
    if not results:
        raise ValueError("results is empty; make it with breakdowns(sizes, schemes, batches).")
    batches = list(next(iter(results.values())))
    headers = ["size", "mode", "precision", "weights", "master", "gradients", "AdamW"]
    for b in batches:
        headers += [f"activ. {b}x{tokens}", f"total {b}x{tokens}"]
    rows = []
    for (size, mode, precision), by_batch in results.items():
        first = by_batch[batches[0]]
        row = [size, mode, precision, *(f"{x / 1e9:.2f}" for x in first[:4])]
        for b in batches:
            row += [f"{by_batch[b].activations / 1e9:.2f}", f"{by_batch[b].total / 1e9:.2f}"]
        rows.append(row)
    return format_table(headers, rows)


def verdict(claimed_gb: float, memory: Memory, batch: int, tokens: int) -> str:
    """The verdict on a claimed memory figure of `claimed_gb` GB (1e9 bytes), given the computed
    `memory` at (batch, tokens), whose activations must be measured (above 0).

    "corrected" when the weights, or the model states (weights, master copy, gradients,
    AdamW states), alone exceed the claim; "true" when the claim holds everything; otherwise
    "true only in a stated context": the share of the measured activations that the claim
    leaves room for. Raises ValueError for a claim that is not a positive number, a batch or
    token count below 1, or a count without activations.
    """
    if (
        isinstance(claimed_gb, bool)
        or not isinstance(claimed_gb, numbers.Real)
        or not 0 < claimed_gb < math.inf
    ):
        raise ValueError(f"claimed_gb must be a positive, finite number of GB, got {claimed_gb!r}.")
    positive_int("batch", batch, "e.g. batch=8")
    positive_int("tokens", tokens, "e.g. tokens=8")
    if memory.activations <= 0:
        raise ValueError(
            "The count has no activations; measure them: breakdowns(...)[size, mode, precision]"
            "[batch], or states._replace(activations=activation_bytes(model, batch, tokens))."
        )
    claimed = claimed_gb * 1e9
    if memory.weights > claimed:
        return f"corrected: the weights alone are {memory.weights / 1e9:.1f} GB"
    if memory.model_states > claimed:
        return (
            "corrected: the weights, gradients and AdamW states alone are "
            f"{memory.model_states / 1e9:.1f} GB"
        )
    room = claimed - memory.model_states
    if room >= memory.activations:
        return (
            f"true: {claimed_gb:g} GB holds the weights, states and the activations of batch "
            f"{batch} x {tokens} tokens ({memory.total / 1e9:.2f} GB in all)"
        )
    return (
        f"true only in a stated context: {claimed_gb:g} GB leaves {room / 1e9:.1f} GB for "
        f"activations, {room / memory.activations:.2f} of what batch {batch} x {tokens} tokens "
        f"keeps ({memory.activations / 1e9:.1f} GB), without gradient checkpointing"
    )
