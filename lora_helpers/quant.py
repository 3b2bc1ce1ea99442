"""4-bit blockwise quantisation written out (absmax int4 and NF4), and LoRA on a quantised base.

A weight is cut into blocks of `block_size` consecutive values (row-major). Each block keeps
one float32 scale, its absmax = max |w|, and each value becomes the index (a 4-bit code) of the
level nearest to w / absmax in a fixed table of levels in [-1, 1]:

    int4: 15 evenly spaced levels k / 7, k = -7..7 (symmetric, exact zero)
    nf4:  16 levels at quantiles of a normal distribution (QLoRA's "NormalFloat"), exact zero

Dequantised, a value is levels[code] * absmax, so its error is at most absmax times half the
widest gap between adjacent levels: absmax / 14 for int4, about 0.152 * absmax for nf4.
Two codes share a byte, so n weights take n / 2 bytes plus 4 bytes per block for the scales.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALayer, RankWarning, adapter_dtype, is_adapter

SCHEMES = ("int4", "nf4")


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, shape (16,), ascending, from -1 to 1 with an exact 0.

    As in QLoRA: 8 quantiles of N(0, 1) for the positive side and 7 for the negative side,
    taken between probabilities 0.5 and 0.9677 (so the outermost is finite), then divided by
    the largest so that they span [-1, 1].
    """
    offset = 0.9677083  # QLoRA's choice: the mean of the last quantile bins for 15 and 16 levels
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float()


def int4_levels() -> torch.Tensor:
    """The 15 symmetric int4 levels k / 7 for k = -7..7, shape (15,)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def levels_for(scheme: str) -> torch.Tensor:
    """The level table of `scheme` ("int4" or "nf4"), ascending, within [-1, 1]."""
    if scheme == "int4":
        return int4_levels()
    if scheme == "nf4":
        return nf4_levels()
    raise ValueError(f"Unknown quantisation scheme {scheme!r}; use one of {SCHEMES}.")


def max_error_fraction(scheme: str) -> float:
    """Half the widest gap between adjacent levels: |w - dequantised w| <= this * block absmax."""
    return torch.diff(levels_for(scheme).double()).max().item() / 2


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15, shape (n,) with n even -> uint8 (n // 2,): code 2i in the low 4 bits, 2i+1 high.

    Raises TypeError for anything but an integer tensor, ValueError for another shape or a
    code outside 0..15.
    """
    if not isinstance(codes, torch.Tensor) or not _is_integer(codes.dtype):
        what = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(
            f"pack_4bit takes a tensor of integer codes 0..15, got {what}; pass the codes "
            "quantize_4bit computes (or round and cast them: codes.round().long())."
        )
    if codes.ndim != 1 or codes.numel() % 2:
        raise ValueError(
            f"pack_4bit takes a flat tensor with an even number of codes, got shape "
            f"{tuple(codes.shape)}; flatten it and pad it to an even length."
        )
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("4-bit codes must lie in 0..15; these do not fit in 4 bits.")
    codes = codes.to(torch.uint8)
    return codes[0::2] | (codes[1::2] << 4)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (m,) -> codes (2 m,) as uint8, the inverse of pack_4bit."""
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(
            f"unpack_4bit takes a flat uint8 tensor, got dtype {packed.dtype} and shape "
            f"{tuple(packed.shape)}."
        )
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()


@dataclass(frozen=True)
class Quantized4bit:
    """A 4-bit blockwise-quantised tensor: packed codes (numel // 2,) uint8, absmax (blocks,) float32."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    block_size: int
    scheme: str

    @property
    def nbytes(self) -> int:
        """Bytes stored: the packed codes plus the per-block scales."""
        return self.packed.numel() * self.packed.element_size() + (
            self.absmax.numel() * self.absmax.element_size()
        )

    def error_bound(self) -> torch.Tensor:
        """The largest possible |w - dequantised w| of each element, shape `shape`."""
        bound = self.absmax * max_error_fraction(self.scheme)
        return bound.repeat_interleave(self.block_size).view(self.shape)


def quantize_4bit(weight: torch.Tensor, block_size: int = 64, scheme: str = "nf4") -> Quantized4bit:
    """Quantise `weight` (any shape, numel a multiple of block_size) blockwise to 4-bit codes.

    Raises TypeError if `weight` is not a tensor (for a layer use QuantizedLinear), ValueError
    for a bad block size or scheme, a numel that block_size does not divide, or inf / NaN.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"quantize_4bit takes a weight tensor, got {type(weight).__name__}; pass "
            "layer.weight, or use QuantizedLinear(layer) to quantise an nn.Linear."
        )
    levels = levels_for(scheme).to(weight.device)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}; 64 is usual.")
    if block_size % 2:
        raise ValueError(
            f"block_size must be even so that two 4-bit codes fill each byte, got {block_size}."
        )
    n = weight.numel()
    if n % block_size:
        raise ValueError(
            f"The weight has {n} elements, not a multiple of block_size={block_size}; choose a "
            "block size that divides the number of elements (e.g. one that divides a row)."
        )
    if not torch.isfinite(weight).all():
        raise ValueError("The weight holds inf or NaN values; 4-bit blocks cannot represent them.")
    blocks = weight.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block keeps absmax 0; divide by 1 instead, and every value gets the level 0.
    normalised = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    # Nearest level: count the midpoints between adjacent levels that lie below the value.
    codes = torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2)
    return Quantized4bit(pack_4bit(codes.flatten()), absmax, weight.shape, block_size, scheme)


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to a dense tensor of shape q.shape: levels[code] * absmax of the code's block.

    Raises TypeError unless `q` is a Quantized4bit and `dtype` a floating torch.dtype.
    """
    if not isinstance(q, Quantized4bit):
        raise TypeError(
            f"dequantize_4bit takes a Quantized4bit (what quantize_4bit returns), got "
            f"{type(q).__name__}; quantise the weight first: dequantize_4bit(quantize_4bit(w))."
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}."
        )
    levels = levels_for(q.scheme).to(q.packed.device)
    values = levels[unpack_4bit(q.packed).long()].view(-1, q.block_size) * q.absmax[:, None]
    return values.view(q.shape).to(dtype)


class QuantizedLinear(nn.Module):
    """A frozen linear layer with a 4-bit weight: x (..., in) -> x W^T + b, W dequantised on the fly."""

    def __init__(self, linear: nn.Linear, block_size: int = 64, scheme: str = "nf4") -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedLinear quantises an nn.Linear, got {type(linear).__name__}.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype  # what forward, LoRA on top and a merge compute in
        q = quantize_4bit(linear.weight, block_size, scheme)
        self.block_size, self.scheme = block_size, scheme
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    @property
    def quantized(self) -> Quantized4bit:
        """The stored weight as a Quantized4bit."""
        shape = torch.Size((self.out_features, self.in_features))
        return Quantized4bit(self.packed, self.absmax, shape, self.block_size, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_4bit(self.quantized, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme}, block_size={self.block_size}"
        )


class QuantizedLinearWithLoRA(nn.Module):
    """A frozen QuantizedLinear plus a LoRALayer (QLoRA): x (..., in) -> base(x) + lora(x), (..., out)."""

    def __init__(
        self,
        base: QuantizedLinear,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, QuantizedLinear):
            raise TypeError(
                f"QuantizedLinearWithLoRA wraps a QuantizedLinear, got {type(base).__name__}; "
                "for an nn.Linear use lora_helpers.lora.LinearWithLoRA."
            )
        self.base = base
        self.lora = LoRALayer(
            base.in_features,
            base.out_features,
            rank,
            alpha,
            dropout=dropout,
            rslora=rslora,
            dtype=adapter_dtype(base.weight_dtype),
            device=base.absmax.device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora(x.to(self.lora.A.dtype)).to(x.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A float nn.Linear with weight dequantised W + scaling * (A @ B)^T: same outputs, 8x the bytes.

        Merging into the 4-bit weight itself would need quantising W + delta again, which adds
        a new rounding error; a merged model is therefore kept in float (or bf16).
        """
        base = self.base
        linear = nn.Linear(
            base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight_dtype
        )
        linear.weight.copy_(
            dequantize_4bit(base.quantized, base.weight_dtype) + self.lora.delta_weight()
        )
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.to(base.absmax.device)


def quantize_linears(module: nn.Module, block_size: int = 64, scheme: str = "nf4") -> nn.Module:
    """Replace every nn.Linear inside `module` (in place) by a frozen QuantizedLinear; returns it.

    Raises ValueError, before changing anything: if a LoRA or DoRA layer holds one of them
    (quantise the base first, then add LoRA with add_lora_to_quantized), if there is no
    nn.Linear (or the module is quantised already), or if any layer cannot be quantised
    (quantize_4bit's errors, naming the layer).
    """
    adapted = [n for n, m in module.named_modules() if is_adapter(m)]
    if adapted:
        where = f"Layer {adapted[0]!r}" if adapted[0] else "The module itself"
        raise ValueError(
            f"{where} already carries a {type(module.get_submodule(adapted[0])).__name__}; "
            "quantising the nn.Linear inside it would put a second change under the adapter. "
            "Quantise the base first, then add LoRA with add_lora_to_quantized."
        )
    linears = [(n, m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
    if not linears and any(isinstance(m, QuantizedLinear) for m in module.modules()):
        raise ValueError(
            f"{type(module).__name__} is quantised already: it holds no nn.Linear layer to "
            "quantise, only QuantizedLinear ones; call quantize_linears once per model."
        )
    if not linears:
        raise ValueError(
            f"{type(module).__name__} holds no nn.Linear layer to quantise; for a single layer "
            "use QuantizedLinear(linear)."
        )
    built = {}  # every layer first, so that an error leaves the module as it was
    for name, linear in linears:
        try:
            built[name] = QuantizedLinear(linear, block_size, scheme)
        except ValueError as error:
            raise ValueError(f"Layer {name!r}: {error}") from None
    for name, layer in built.items():
        module.set_submodule(name, layer)
    return module


def add_lora_to_quantized(
    module: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False
) -> nn.Module:
    """Wrap every QuantizedLinear inside `module` (in place) in a QuantizedLinearWithLoRA; returns it.

    Freezes nothing: the new A and B train, and so does every other parameter of `module`
    that did before (embeddings, norms, layers left in float). To train only A and B, call
    lora.freeze(module) first (the 4-bit weights are buffers and never train).
    Raises ValueError, before changing anything, if there is no QuantizedLinear (call
    quantize_linears first) or every one carries LoRA already, and for a bad rank or alpha.
    """
    found = [(n, m) for n, m in module.named_modules() if n and isinstance(m, QuantizedLinear)]
    wrapped = {id(m.base) for m in module.modules() if isinstance(m, QuantizedLinearWithLoRA)}
    found = [(n, m) for n, m in found if id(m) not in wrapped]
    if not found and wrapped:
        raise ValueError(
            f"{type(module).__name__} holds no unwrapped QuantizedLinear: each one already "
            "carries LoRA (a QuantizedLinearWithLoRA); add LoRA once, to a fresh copy of the "
            "quantised model."
        )
    if not found:
        raise ValueError(
            f"{type(module).__name__} holds no unwrapped QuantizedLinear; call "
            "quantize_linears(module) first."
        )
    with warnings.catch_warnings():  # one RankWarning naming the layers, below
        warnings.simplefilter("ignore", RankWarning)
        built = {
            name: QuantizedLinearWithLoRA(base, rank, alpha, dropout=dropout, rslora=rslora)
            for name, base in found
        }
    oversized = [n for n, b in found if rank > min(b.in_features, b.out_features)]
    if oversized:
        warnings.warn(
            f"rank {rank} is larger than min(in, out) of {len(oversized)} layer(s), e.g. "
            f"{oversized[0]!r}: the extra parameters buy nothing.",
            RankWarning,
            stacklevel=2,
        )
    for name, layer in built.items():
        layer.train(module.get_submodule(name).training)
        module.set_submodule(name, layer)
    return module


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of the 4-bit weights (packed codes + scales) of every QuantizedLinear in `module`."""
    return sum(m.quantized.nbytes for m in module.modules() if isinstance(m, QuantizedLinear))


def bitsandbytes_4bit_available() -> bool:
    """True where CUDA and the bitsandbytes package are both present (the real 4-bit kernels)."""
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def bitsandbytes_nf4_weight(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Quantise `weight` with bitsandbytes' NF4 on the GPU and dequantise it again (CUDA only)."""
    if not bitsandbytes_4bit_available():
        raise RuntimeError(
            "bitsandbytes 4-bit quantisation needs a CUDA GPU and `pip install bitsandbytes`; "
            "use quantize_4bit / dequantize_4bit, which run anywhere."
        )
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.detach().cuda(), blocksize=block_size, quant_type="nf4"
    )
    return bnbf.dequantize_4bit(packed, state).float().cpu()
