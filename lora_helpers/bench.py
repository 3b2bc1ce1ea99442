"""What LoRA saves, measured: step time, memory, checkpoint size and inference latency.

    python -m lora_helpers.bench --size gpt2-small --batch 8 --tokens 64 --steps 20 --device cpu --out results

GPT-2 of a published size (or `tiny`, for tests) with random weights, since speed and
memory do not depend on the values, trains on random token ids with the next-token
loss in four modes:

- "lora": LinearWithLoRA (rank 16, alpha 16 by default) on every nn.Linear of the blocks;
- "full": every parameter;
- "last-block": the last block and the final norm (the head is the token embedding, tied);
- "peft-lora": transformers' GPT2LMHeadModel with PEFT's LoRA of the same rank on the same
  matrices (c_attn, attn.c_proj, c_fc, mlp.c_proj; transformers stores them as Conv1D, hence
  fan_in_fan_out=True). PEFT is imported for this mode only; without it the mode is skipped,
  saying so.

Each mode trains in a process of its own, as it would alone: in one process, the memory
one mode frees changes how fast another gets memory (on Linux, page faults of fresh
allocations cost a CPU step up to a third of its time). Each process runs two warm-up
steps (they create the AdamW states and give the memory peak); then the processes take
turns step by step, so that noise on a shared machine hits the modes alike. The step time
is the median of the timed steps, with the device synchronised; `summary` adds their middle
half (lower to upper quartile), and `ratios` compares two modes round by round. Peak memory
is CUDA's allocator peak on a CUDA GPU; elsewhere it is computed: weights + gradients +
AdamW states + the tensors autograd saves for backward (counted during a step), and the
JSON says which. Checkpoint bytes are what each mode must save
(train.save_checkpoint: the adapter for LoRA, the whole model for full fine-tuning, the
block for last-block; PEFT's save_pretrained for peft-lora). Inference latency is a forward
pass of the base, of LoRA unmerged and of LoRA merged (lora.merge_lora), in turns too (the
JSON keeps each pass's seconds under "inference_seconds_each", each step's under a mode's
"step_seconds_each").

Writes <out>/bench-<device>-<size>.json and .png (device: "cpu", "mps" or the GPU's name).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import multiprocessing
import os
import platform
import re
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from .assets import writable_folder
from .checks import positive_int
from .gpt2 import GPT2Source, GPTModel, gpt2_config
from .lora import (
    LinearWithLoRA,
    check_rank_alpha,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    wrap_linear_layers,
)
from .peft_format import transformers_config
from .protocol import format_table
from .train import (
    autocast_dtype,
    best_device,
    checkpoint_size,
    device_slug,
    format_bytes,
    save_checkpoint,
    write_json_and_png,
)

SIZES = ("tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
MODES = ("lora", "full", "last-block", "peft-lora")
#: PEFT's names for the matrices our LoRA wraps (W_query, W_key and W_value are its c_attn).
PEFT_TARGETS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
#: Two blocks of 64 dimensions and a 512-token vocabulary: the whole benchmark in seconds.
TINY_CONFIG = {
    "vocab_size": 512,
    "context_length": 64,
    "emb_dim": 64,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": True,
}
WARMUP_STEPS = 2
COMPUTED = "computed: weights + gradients + AdamW states + activations"
#: Dense bf16 (fp16 on T4 and V100) tensor-core peaks, TFLOP/s, from NVIDIA's datasheets
#: (SXM parts); the first name found in the GPU's name is used for MFU.
PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "v100": 125.0, "t4": 65.0}


def bench_config(size: str) -> dict:
    """The GPTModel config of `size`: one of SIZES."""
    if size == "tiny":
        return dict(TINY_CONFIG)
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; use one of {list(SIZES)}.")
    return gpt2_config(size)


# ------------------------------------------------------------------- what is computed


def matmul_params(cfg: dict) -> int:
    """N, the weights every token is multiplied by: 12 d^2 per block (Q, K, V, out: 4 d^2;
    the 4x-wide MLP: 8 d^2) plus the head's d * vocab. Biases, norms and the embeddings'
    lookups are left out, as in Kaplan et al. (2020) and PaLM (Chowdhery et al., 2022, app. B)."""
    d = cfg["emb_dim"]
    return 12 * cfg["n_layers"] * d * d + d * cfg["vocab_size"]


class Flops(NamedTuple):
    """Training FLOPs per token (2 per multiply-add)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def flops_per_token(cfg: dict, mode: str, tokens: int, adapter_params: int = 0) -> Flops:
    """FLOPs per token of one training step of `mode` on sequences of `tokens` tokens.

    A weight costs 2 FLOPs per token forward; backward, 2 for the input's gradient and 2
    for its own when it trains. So full fine-tuning costs 6N; a frozen base 4N (its
    weights' gradients are never formed) plus 6 per adapter weight; last-block 2N forward
    and, backward, the head's input gradient (2 d V) and 4 per weight of the last block.
    Attention adds 4 d T per layer and token forward (q k^T and the weighted sum over T
    keys, the causal mask not subtracted, as in PaLM's appendix B) and twice that backward,
    in every layer the gradient passes through. Raises ValueError for an unknown mode, a
    token count that is not a positive int or adapter_params that is not an int >= 0.
    """
    positive_int("tokens", tokens)
    if (
        isinstance(adapter_params, bool)
        or not isinstance(adapter_params, int)
        or adapter_params < 0
    ):
        raise ValueError(
            f"adapter_params must be an int >= 0 (the adapters' trainable numbers), got "
            f"{adapter_params!r}."
        )
    n, d, layers = matmul_params(cfg), cfg["emb_dim"], cfg["n_layers"]
    attention = 4 * d * tokens  # one layer, forward
    forward = 2 * n + layers * attention
    if mode == "full":
        return Flops(forward, 4 * n + layers * 2 * attention)
    if mode in ("lora", "peft-lora"):
        return Flops(
            forward + 2 * adapter_params, 2 * n + 4 * adapter_params + layers * 2 * attention
        )
    if mode == "last-block":
        return Flops(forward, 2 * d * cfg["vocab_size"] + 4 * 12 * d * d + 2 * attention)
    raise ValueError(f"Unknown mode {mode!r}; use one of {list(MODES)}.")


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name` (PEAK_TFLOPS), or None if unknown."""
    words = re.findall(r"[a-z0-9]+", device_name.lower())
    return next((PEAK_TFLOPS[w] for w in words if w in PEAK_TFLOPS), None)


class MemoryBreakdown(NamedTuple):
    """Bytes a training step holds at its peak, computed rather than measured."""

    weights: int  # every parameter and buffer
    gradients: int  # one per trained number, in its dtype
    adamw_states: int  # exp_avg and exp_avg_sq per trained number (step counters left out)
    activations: int  # what autograd saves for backward during the forward pass

    @property
    def total(self) -> int:
        return sum(self)


def memory_breakdown(model: nn.Module, activations: int) -> MemoryBreakdown:
    """Weights, gradients and AdamW states of `model` in bytes (shared tensors once), plus
    `activations` bytes (from count_saved_tensors)."""
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return MemoryBreakdown(weights, trained, 2 * trained, activations)


@contextlib.contextmanager
def count_saved_tensors(model: nn.Module) -> Iterator[dict[int, int]]:
    """Inside the block, the tensors autograd saves for backward are counted into the
    yielded dict, {storage address: bytes}: each storage once, the model's parameters left
    out (they are weights). Uses torch.autograd.graph.saved_tensors_hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


# ------------------------------------------------------------------------- the modes


def build_model(cfg: dict, mode: str, device: torch.device, rank: int = 16, alpha: float = 16):
    """A randomly initialised GPT-2 of `cfg` on `device`, set up to train in `mode`.

    Raises ImportError for "peft-lora" when peft is not installed.
    """
    if mode == "peft-lora":
        return _peft_model(cfg, device, rank, alpha)
    with torch.device(device):
        model = GPTModel(cfg)
    if mode == "lora":
        wrap_linear_layers(model.trf_blocks, LinearWithLoRA, rank=rank, alpha=alpha)
        mark_only_lora_as_trainable(model)
    elif mode == "last-block":
        model.requires_grad_(False)
        model.trf_blocks[-1].requires_grad_(True)
        model.final_norm.requires_grad_(True)
    elif mode != "full":
        raise ValueError(f"Unknown mode {mode!r}; use one of {list(MODES)}.")
    return model.train()


def _peft_model(cfg: dict, device: torch.device, rank: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # imported when asked for: it takes seconds
    from transformers import GPT2LMHeadModel

    config = transformers_config(
        cfg,
        use_cache=False,  # training keeps no key/value cache
        attn_implementation="sdpa",  # the fused attention our model uses too
    )
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, fan_in_fan_out=True)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices
        return get_peft_model(GPT2LMHeadModel(config), lora).train()


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (ours or transformers') on ids (batch, tokens).

    Targets are the ids shifted left, the last position ignored (-100), as transformers does:
    no slice of the (batch, tokens, vocab) logits, whose gradient would be a copy.
    """
    out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _autocast(device: torch.device):
    """bf16 (fp16 on older GPUs) autocast on CUDA as notebook 05 trains; float32 elsewhere."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _timed(device: torch.device, work) -> float:
    """Seconds `work()` takes, the device synchronised before and after."""
    _sync(device)
    started = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - started


class _Trainer(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, ids: torch.Tensor) -> None:
        with _autocast(ids.device):
            loss = lm_loss(self.model, ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _trainer(model: nn.Module, device: torch.device) -> _Trainer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")  # one kernel for all parameters
    return _Trainer(model, torch.optim.AdamW(params, lr=1e-4, fused=fused))


# --------------------------------------------------------------------------- the run


def _check(
    size: str,
    batch: int,
    tokens: int,
    steps: int,
    modes: Sequence[str],
    rank: int = 16,
    alpha: float = 16,
) -> dict:
    cfg = bench_config(size)
    positive_int("batch", batch)
    positive_int("steps", steps)
    check_rank_alpha(rank, alpha)
    if not 2 <= tokens <= cfg["context_length"]:
        raise ValueError(
            f"tokens must be between 2 and {size}'s context length {cfg['context_length']}, "
            f"got {tokens}."
        )
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"Unknown mode(s) {unknown or modes!r}; use some of {list(MODES)}.")
    return cfg


def device_name(device: torch.device) -> str:
    """The GPU's name, "Apple GPU", or the CPU's model name with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    return f"{cpu}, {torch.get_num_threads()} threads"


class _Setting(NamedTuple):
    """What every mode's process needs to know."""

    size: str
    cfg: dict
    batch: int
    tokens: int
    device: str
    rank: int
    alpha: float
    threads: int


def _measure_mode(conn: Connection, mode: str, setting: _Setting) -> None:
    """One mode in a process of its own, as when it trains alone (its own allocator: one mode's
    freed memory never speeds up or slows down another's). Warms up and measures memory, then
    answers each "step" with the seconds of a training step, and "finish" with its numbers.
    Any error is sent back for run() to raise."""
    try:
        torch.set_num_threads(setting.threads)
        device = torch.device(setting.device)
        torch.manual_seed(0)
        ids = torch.randint(
            setting.cfg["vocab_size"], (setting.batch, setting.tokens), device=device
        )
        model = build_model(setting.cfg, mode, device, setting.rank, setting.alpha)
        trainer = _trainer(model, device)
        trainer.step(ids)  # creates the AdamW states; the second step sees the steady state
        with count_saved_tensors(model) as saved, _autocast(device):
            loss = lm_loss(model, ids)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        memory = memory_breakdown(model, activations=sum(saved.values()))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        conn.send("ready")
        while conn.recv() == "step":
            conn.send(_timed(device, lambda: trainer.step(ids)))
        source = GPT2Source(setting.size, False, f"random {setting.size}-shaped weights")
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = _checkpoint_bytes(model, mode, Path(scratch), source)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        conn.send(
            {
                "trainable_params": trainable,
                "peak_memory_bytes": memory.total if peak is None else peak,
                "checkpoint_bytes": checkpoint,
                "peak_memory_method": COMPUTED if peak is None else "cuda allocator peak",
                "memory_breakdown_computed": memory._asdict(),
                "flops_per_token": flops_per_token(
                    setting.cfg, mode, setting.tokens, trainable if "lora" in mode else 0
                ).total,
            }
        )
    except BaseException:
        conn.send(RuntimeError(f"The {mode} process failed:\n{traceback.format_exc()}"))


def _receive(conn: Connection, mode: str):
    """The next message of `mode`'s process; raises the error it sent, or that it died."""
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"The {mode} process died (out of memory?).") from None
    if isinstance(message, Exception):
        raise message
    return message


def _process_context(peft: bool) -> multiprocessing.context.BaseContext:
    """How the modes' processes start: none shares state (tensors, allocator) with another.

    Where it exists (Linux, macOS), a fork server: one process imports torch (and peft) once,
    then forks a clean copy of itself for each mode, instead of each mode importing them anew
    (seconds each). Elsewhere (Windows), a fresh interpreter per mode.
    It preloads what this module imports, not this module: under `python -m lora_helpers.bench`
    each process runs it again as its main module, and runpy warns if it is imported already.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "lora_helpers.train",
            "lora_helpers.peft_format",
            *(["peft", "transformers"] if peft else []),
        ]
    )
    return context


def run(
    size: str = "gpt2-small",
    *,
    batch: int = 8,
    tokens: int = 64,
    steps: int = 5,
    device: torch.device | str | None = None,
    modes: Sequence[str] = MODES,
    rank: int = 16,
    alpha: float = 16,
    progress: bool = True,
) -> dict:
    """Measure `modes` at `size`; returns the results as a JSON-ready dict (see the module).

    Each mode trains in a process of its own, started here, on `torch.get_num_threads()`
    threads; the processes take turns step by step. Raises ValueError for a bad size, mode,
    device, batch, token count, step count, rank or alpha; RuntimeError if a mode's process
    fails.
    """
    cfg = _check(size, batch, tokens, steps, modes, rank, alpha)
    device = best_device(device)
    modes = list(dict.fromkeys(modes))
    if "peft-lora" in modes and importlib.util.find_spec("peft") is None:
        if modes == ["peft-lora"]:
            raise ValueError("peft-lora needs peft: pip install peft.")
        print("peft is not installed: skipping peft-lora (pip install peft).")
        modes.remove("peft-lora")
    setting = _Setting(size, cfg, batch, tokens, device.type, rank, alpha, torch.get_num_threads())
    total = len(modes) * (WARMUP_STEPS + steps) + 3 * (steps + 1)
    bar = tqdm(total=total, desc="warm-up", unit="step", disable=not progress)
    context = _process_context(peft="peft-lora" in modes)
    processes, results = {}, {}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for mode in modes:
            conn, theirs = context.Pipe()
            process = context.Process(target=_measure_mode, args=(theirs, mode, setting))
            process.start()
            processes[mode] = process, conn
        for mode, (_, conn) in processes.items():
            _receive(conn, mode)
            bar.update(WARMUP_STEPS)
        bar.set_description("training")
        for _ in range(steps):  # round-robin
            for mode, (_, conn) in processes.items():
                conn.send("step")
                times[mode].append(_receive(conn, mode))
                bar.update(1)
        for mode, (process, conn) in processes.items():
            conn.send("finish")
            seconds = statistics.median(times[mode])
            results[mode] = {
                "step_seconds": seconds,
                "tokens_per_second": batch * tokens / seconds,
                **_receive(conn, mode),
                "step_seconds_each": times[mode],
            }
            process.join()
    finally:
        for process, _ in processes.values():
            if process.is_alive():
                process.terminate()

    bar.set_description("inference")
    inference = _inference_latency(setting, device, steps, bar)
    bar.close()
    return {
        "device": device_slug(device),
        "device_name": device_name(device),
        "size": size,
        "batch": batch,
        "tokens": tokens,
        "modes": results,
        "inference": {name: statistics.median(times) for name, times in inference.items()},
        "inference_seconds_each": inference,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "rank": rank,
        "alpha": alpha,
        "precision": str(autocast_dtype(device) or torch.float32).removeprefix("torch."),
        "torch": torch.__version__,
        "flops_note": "full 6N, lora 4N + 6 * adapter weights, last-block "
        "2N + 2 d V + 48 d^2, each + attention 12 L d T (N = 12 L d^2 + d V)",
    }


def _checkpoint_bytes(model: nn.Module, mode: str, scratch: Path, source: GPT2Source) -> int:
    """Bytes on disk of what `mode` must save (see the module), written into `scratch`."""
    if mode == "peft-lora":
        model.save_pretrained(scratch / mode)
        return checkpoint_size(scratch / mode)
    return checkpoint_size(save_checkpoint(model, mode, scratch / mode, source))


def _inference_latency(
    setting: _Setting, device: torch.device, steps: int, bar
) -> dict[str, list[float]]:
    """Seconds of `steps` forward passes each of the base, LoRA unmerged and LoRA merged, in
    turns, after one pass each to warm up; B is drawn at random (as after training), so that
    merging changes the weights."""
    torch.manual_seed(0)
    ids = torch.randint(setting.cfg["vocab_size"], (setting.batch, setting.tokens), device=device)
    with torch.device(device):
        base = GPTModel(setting.cfg).eval()
    lora = copy.deepcopy(base)
    wrap_linear_layers(lora.trf_blocks, LinearWithLoRA, rank=setting.rank, alpha=setting.alpha)
    for _, layer in lora_layers(lora):
        nn.init.normal_(layer.lora.B, std=0.02)
    models = {"base": base, "lora-unmerged": lora, "lora-merged": merge_lora(copy.deepcopy(lora))}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 1):
        for name, model in models.items():
            with torch.inference_mode(), _autocast(device):
                seconds = _timed(device, lambda m=model: m(ids))
            if i:  # the first pass of each warms up
                times[name].append(seconds)
            bar.update(1)
    return times


# ---------------------------------------------------------------------- the results


class Middle(NamedTuple):
    """The median of `n` repeated measurements and their middle half (lower to upper quartile)."""

    median: float
    low: float
    high: float
    n: int

    def format(self, fmt: str = ".2f", scale: float = 1.0) -> str:
        """'median (low-high)', each scaled and formatted with `fmt`; the median alone for n = 1."""
        median, low, high = (scale * v for v in (self.median, self.low, self.high))
        return f"{median:{fmt}}" + (f" ({low:{fmt}}-{high:{fmt}})" if self.n > 1 else "")


def middle_half(values: Sequence[float]) -> Middle:
    """Median and quartiles of `values` (NaN for none): robust to the odd step that a busy
    machine slows down many times over. Raises ValueError for a NaN among them."""
    if any(math.isnan(v) for v in values):
        raise ValueError(f"Cannot take the middle half of values with a NaN: {list(values)}.")
    if len(values) < 2:
        value = values[0] if values else math.nan
        return Middle(value, value, value, len(values))
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return Middle(median, low, high, len(values))


#: The ratios a result is judged by: name -> (numerator, denominator, which timings).
RATIOS = {
    "lora / full step time": ("lora", "full", "modes"),
    "last-block / full step time": ("last-block", "full", "modes"),
    "lora / peft-lora step time": ("lora", "peft-lora", "modes"),
    "merged / base inference": ("lora-merged", "base", "inference"),
    "unmerged / base inference": ("lora-unmerged", "base", "inference"),
}


def inference_times(result: dict) -> dict[str, list[float]]:
    """Seconds of each inference pass per model; a result written before they were kept
    has only the medians, taken as one pass each."""
    each = result.get("inference_seconds_each")
    return each if each else {name: [seconds] for name, seconds in result["inference"].items()}


def ratio(result: dict, numerator: str, denominator: str, kind: str = "modes") -> Middle:
    """Timings of `numerator` over those of `denominator` (modes, or with kind="inference" the
    models of the inference latency), round by round: they took turns, so the two timings of
    one round met the same load on the machine. The median of the per-round ratios with their
    middle half; NaN when either did not run. Raises ValueError for another kind, or timings
    that are not one positive number per round for both."""
    if kind not in ("modes", "inference"):
        raise ValueError(f"kind must be 'modes' or 'inference', got {kind!r}.")
    times = (
        {mode: r["step_seconds_each"] for mode, r in result["modes"].items()}
        if kind == "modes"
        else inference_times(result)
    )
    top, bottom = times.get(numerator), times.get(denominator)
    if not top or not bottom:
        return middle_half([])
    if len(top) != len(bottom) or not all(t > 0 for t in (*top, *bottom)):
        raise ValueError(
            f"{numerator} and {denominator} need one positive time per round each, got {top} and "
            f"{bottom}."
        )
    return middle_half([a / b for a, b in zip(top, bottom, strict=True)])


def ratios(result: dict) -> dict[str, Middle]:
    """The ratios of RATIOS (see `ratio`)."""
    return {name: ratio(result, *how) for name, how in RATIOS.items()}


def verdict(per_round: Middle) -> str:
    """Below or above 1 only when the whole middle half of the per-round ratios is (and there
    are at least 4 rounds); else within the round-to-round spread."""
    if math.isnan(per_round.median):
        return "not measured"
    if per_round.n < 4:
        return f"too few rounds ({per_round.n}) to judge"
    if per_round.high < 1:
        return "below 1: the whole middle half of the rounds is"
    if per_round.low > 1:
        return "above 1: the whole middle half of the rounds is"
    return "within the round-to-round spread: no measurable difference"


def summary(result: dict) -> str:
    """A text table of one result: per mode, step time (median and middle half), tokens/s,
    trainable parameters, peak memory (computed ones marked *), checkpoint; then inference
    and the ratios whose modes ran, each with its middle half and verdict."""
    rows = [
        [
            mode,
            middle_half(r["step_seconds_each"]).format(",.0f", 1000) + " ms",
            f"{r['tokens_per_second']:,.0f}",
            f"{r['trainable_params']:,}",
            format_bytes(r["peak_memory_bytes"], gb_digits=1)
            + ("*" if "computed" in r["peak_memory_method"] else ""),
            format_bytes(r["checkpoint_bytes"], gb_digits=1),
        ]
        for mode, r in result["modes"].items()
    ]
    headers = ["mode", "step (middle half)", "tokens/s", "trainable", "peak memory", "checkpoint"]
    lines = [
        f"{result['size']}, batch {result['batch']} x {result['tokens']} tokens, on "
        f"{result['device_name']} ({result['precision']}); medians of {result['steps']} steps "
        "and, in brackets, the middle half of them (lower to upper quartile)",
        format_table(headers, rows),
    ]
    if any("computed" in r["peak_memory_method"] for r in result["modes"].values()):
        lines.append("* computed: weights + gradients + AdamW states + activations")
    latency = ", ".join(
        f"{name} {middle_half(times).format(',.0f', 1000)} ms"
        for name, times in inference_times(result).items()
    )
    lines.append(f"inference (one forward pass): {latency}")
    lines.append("ratios, round by round (median and middle half of the rounds):")
    lines += [
        f"  {name}: {middle.format()}, {verdict(middle)}"
        for name, middle in ratios(result).items()
        if not math.isnan(middle.median)
    ]
    return "\n".join(lines)


def flops_report(result: dict) -> str:
    """The FLOP accounting per mode and what it achieves: GFLOP/s, and on a GPU of known
    peak (PEAK_TFLOPS) the model FLOPs utilisation."""
    cfg = bench_config(result["size"])
    peak = peak_tflops(result["device_name"]) if result["device"] != "cpu" else None
    lines = [
        f"FLOPs per token: {result['flops_note']}; N = {matmul_params(cfg):,}, "
        f"attention 12 L d T = {12 * cfg['n_layers'] * cfg['emb_dim'] * result['tokens']:,}."
    ]
    for mode, r in result["modes"].items():
        achieved = r["flops_per_token"] * r["tokens_per_second"]
        mfu = f", MFU {100 * achieved / (peak * 1e12):.1f} % of {peak:g} TFLOP/s" if peak else ""
        lines.append(
            f"  {mode:<10} {r['flops_per_token'] / 1e6:,.1f} MFLOP/token "
            f"({r['flops_per_token'] / (6 * matmul_params(cfg)):.2f} x 6N): "
            f"{achieved / 1e9:,.1f} GFLOP/s{mfu}"
        )
    return "\n".join(lines)


def plot_bench(result: dict) -> Figure:
    """Four panels of one result: step time, peak memory (computed ones by part),
    checkpoint size (log scale) and inference latency."""
    modes = list(result["modes"])
    rows = result["modes"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    _bars_with_middle_half(axes[0], {m: rows[m]["step_seconds_each"] for m in modes}, "tab:blue")
    axes[0].set(ylabel="ms per training step", title="step time (median, middle half)")
    bottom = [0.0] * len(modes)
    parts = ("weights", "gradients", "adamw_states", "activations")
    for part in parts:
        heights = [
            rows[m]["memory_breakdown_computed"][part] / 1e9
            if "computed" in rows[m]["peak_memory_method"]
            else 0.0
            for m in modes
        ]
        axes[1].bar(modes, heights, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    measured = [rows[m]["peak_memory_bytes"] / 1e9 for m in modes]
    if any("computed" not in rows[m]["peak_memory_method"] for m in modes):
        axes[1].bar(modes, measured, fill=False, edgecolor="black", label="allocator peak")
    axes[1].set(ylabel="GB", title="peak memory")
    axes[1].legend(fontsize=7)
    axes[2].bar(modes, [rows[m]["checkpoint_bytes"] / 1e6 for m in modes], color="tab:green")
    axes[2].set(ylabel="MB", yscale="log", title="checkpoint")
    _bars_with_middle_half(axes[3], inference_times(result), "tab:purple")
    axes[3].set(ylabel="ms per forward pass", title="inference (median, middle half)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{result['size']}, batch {result['batch']} x {result['tokens']} tokens, "
        f"{result['device_name']}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _bars_with_middle_half(ax, seconds: dict[str, list[float]], color: str) -> None:
    """Bars of the median milliseconds, with the middle half of the timings as error bars."""
    middles = [middle_half(times) for times in seconds.values()]
    heights = [1000 * m.median for m in middles]
    below = [1000 * (m.median - m.low) for m in middles]
    above = [1000 * (m.high - m.median) for m in middles]
    ax.bar(list(seconds), heights, yerr=[below, above], capsize=3, color=color)


def write_results(result: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write <out>/bench-<device>-<size>.json and .png, each atomically; returns their paths."""
    figure = plot_bench(result)
    try:
        return write_json_and_png(
            out, f"bench-{result['device']}-{result['size']}", result, figure, dpi=110
        )
    finally:
        plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_helpers.bench",
        description="Step time, memory, checkpoint size and inference latency of LoRA, full "
        "fine-tuning, the last block and PEFT's LoRA on random GPT-2 weights.",
    )
    default = " (default: %(default)s)"
    parser.add_argument("--size", default="gpt2-small", choices=SIZES, help="model" + default)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step" + default)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence" + default)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode" + default)
    parser.add_argument(
        "--device",
        choices=("cuda", "mps", "cpu"),
        help="default: the first of cuda, mps, cpu there is",
    )
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=MODES, help="(default: all four)"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA's rank" + default)
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA's alpha" + default)
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG" + default)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: run, print the summary and the FLOP accounting, write the files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # bad arguments: a usage message, before any work
        _check(args.size, args.batch, args.tokens, args.steps, args.modes, args.rank, args.alpha)
        best_device(args.device)
        writable_folder(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    result = run(
        args.size,
        batch=args.batch,
        tokens=args.tokens,
        steps=args.steps,
        device=args.device,
        modes=args.modes,
        rank=args.rank,
        alpha=args.alpha,
        progress=not args.no_progress,
    )
    print(summary(result))
    print(flops_report(result))
    paths = write_results(result, args.out)
    print("wrote", ", ".join(str(p) for p in paths))
    return result


if __name__ == "__main__":
    main()
