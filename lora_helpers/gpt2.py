"""GPT-2 from scratch: configs, the model, OpenAI's weights, the tokenizer, generation, a classifier.

The model reads top to bottom like GPT-2's description: token + position embeddings,
n_layers pre-norm transformer blocks (causal self-attention from lora_helpers.attention,
then a 4x-wide GELU feed-forward, each in a residual branch), a final LayerNorm and a
linear head whose weight is the token embedding (weight tying, as in GPT-2).

Every projection is a plain nn.Linear, so replace_linear_with_lora can reach them all.
Hugging Face's GPT-2 files store the same weights as transformers' Conv1D, (in, out),
with query, key and value fused into one c_attn: load_gpt2_safetensors splits and
transposes them.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
import shutil
import textwrap
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import assets
from .assets import AssetError
from .attention import MultiHeadAttention
from .checks import dropout_probability, positive_int
from .lora import LinearWithLoRA, LoRALayer, evaluating, is_adapter

# ---------------------------------------------------------------------------- configs

#: (emb_dim, n_layers, n_heads) of the four published sizes.
_SIZES = {
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}

#: A small GPT-2 with the real 50,257-token vocabulary, used when pretrained weights are
#: not available: same code, random weights, small enough to fine-tune on a CPU.
FALLBACK_CONFIG = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 128,
    "n_heads": 4,
    "n_layers": 4,
    "drop_rate": 0.1,
    "qkv_bias": True,
}

_CONFIG_KEYS = set(FALLBACK_CONFIG)


def gpt2_config(name: str) -> dict:
    """The config dict of a published GPT-2 size: "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"."""
    if name not in _SIZES:
        raise ValueError(f"Unknown GPT-2 size {name!r}; use one of {list(_SIZES)}.")
    emb_dim, n_layers, n_heads = _SIZES[name]
    return {
        "vocab_size": 50257,
        "context_length": 1024,
        "emb_dim": emb_dim,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "drop_rate": 0.1,
        "qkv_bias": True,
    }


# ------------------------------------------------------------------------------ model


class FeedForward(nn.Module):
    """Position-wise MLP: x (..., emb_dim) -> (..., emb_dim), 4x wider inside, GELU (tanh)."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * emb_dim, emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + att(norm1(x)), then + ff(norm2(x)); (batch, tokens, emb_dim) in and out."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        emb_dim = cfg["emb_dim"]
        self.norm1 = nn.LayerNorm(emb_dim, eps=1e-5)
        self.att = MultiHeadAttention(
            d_in=emb_dim,
            d_out=emb_dim,
            context_length=cfg["context_length"],
            dropout=cfg["drop_rate"],
            num_heads=cfg["n_heads"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.norm2 = nn.LayerNorm(emb_dim, eps=1e-5)
        self.ff = FeedForward(emb_dim)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token ids (batch, tokens) -> logits (batch, tokens, out_features).

    out_head shares its weight with tok_emb (weight tying, as in GPT-2), so parameter
    counts that skip shared tensors (lora.count_parameters) count that matrix once.
    Raises ValueError for a config that lacks a key, has a size below 1, an emb_dim not
    divisible by n_heads, or a drop_rate outside [0, 1).
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        missing = _CONFIG_KEYS - set(cfg)
        if missing:
            raise ValueError(
                f"The config lacks {sorted(missing)}; start from gpt2_config(name) or FALLBACK_CONFIG."
            )
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            positive_int(
                f'cfg["{key}"]', cfg[key], "start from gpt2_config(name) or FALLBACK_CONFIG"
            )
        if cfg["emb_dim"] % cfg["n_heads"]:
            raise ValueError(
                f'cfg["emb_dim"] ({cfg["emb_dim"]}) must be divisible by cfg["n_heads"] '
                f"({cfg['n_heads']}); each head gets emb_dim / n_heads dimensions."
            )
        dropout_probability(cfg["drop_rate"], 'cfg["drop_rate"]')
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg) for _ in range(cfg["n_layers"])))
        self.final_norm = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self._init_weights()
        self.out_head.weight = self.tok_emb.weight  # weight tying

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections / sqrt(2 n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.trf_blocks:
            for proj in (block.att.out_proj, block.ff.layers[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg["n_layers"]))

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        if in_idx.dim() != 2:
            raise ValueError(
                f"Expected token ids of shape (batch, tokens), got shape {tuple(in_idx.shape)}; "
                "add a batch dimension with ids.unsqueeze(0)."
            )
        n_tokens = in_idx.shape[1]
        if n_tokens > self.cfg["context_length"]:
            raise ValueError(
                f"{n_tokens} tokens exceed the context length {self.cfg['context_length']}; "
                f"keep the last ones: in_idx[:, -{self.cfg['context_length']}:]."
            )
        positions = torch.arange(n_tokens, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        x = self.trf_blocks(x)
        return self.out_head(self.final_norm(x))


def parameter_breakdown(model: GPTModel) -> dict[str, int]:
    """Parameters by component (shared tensors once): embeddings, attention, feed-forward, norms, head, LoRA.

    Raises TypeError for a model that is not a GPTModel (its parameter names would not match).
    """
    if not isinstance(model, GPTModel):
        raise TypeError(
            f"parameter_breakdown needs this package's GPTModel, got a {type(model).__name__}; "
            "pass the model from load_gpt2_or_fallback() or GPTModel(cfg)."
        )
    groups = {
        "token embedding": 0,
        "position embedding": 0,
        "attention (Q, K, V, out)": 0,
        "feed-forward": 0,
        "layer norms": 0,
        "output head (untied part)": 0,
        "LoRA (A, B)": 0,
    }
    for name, param in model.named_parameters():  # yields a shared tensor once, by its first name
        if ".lora." in name:
            group = "LoRA (A, B)"
        elif name.startswith("tok_emb."):
            group = "token embedding"
        elif name.startswith("pos_emb."):
            group = "position embedding"
        elif ".att." in name:
            group = "attention (Q, K, V, out)"
        elif ".ff." in name:
            group = "feed-forward"
        elif name.startswith("out_head."):
            group = "output head (untied part)"
        else:
            group = "layer norms"
        groups[group] += param.numel()
    return groups


# ---------------------------------------------------------------------------- weights


class WeightFile(NamedTuple):
    repo: str
    sha256: str
    size: int | None  # bytes, where the published size is known


#: Hugging Face's model.safetensors of each size; sha256 (and sizes) as Hugging Face lists them.
WEIGHT_FILES = {
    "gpt2-small": WeightFile(
        "openai-community/gpt2",
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        548_105_171,
    ),
    "gpt2-medium": WeightFile(
        "openai-community/gpt2-medium",
        "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
        1_519_984_962,
    ),
    "gpt2-large": WeightFile(
        "openai-community/gpt2-large",
        "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
        None,
    ),
    "gpt2-xl": WeightFile(
        "openai-community/gpt2-xl",
        "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
        None,
    ),
}


def weights_url(name: str) -> str:
    """Where Hugging Face serves the model.safetensors of GPT-2 size `name`."""
    gpt2_config(name)  # validates the name
    return f"https://huggingface.co/{WEIGHT_FILES[name].repo}/resolve/main/model.safetensors"


def weights_relpath(name: str) -> str:
    """The file's place in the cache and in LORA_ASSETS_PATH folders: gpt2/<name>/model.safetensors."""
    gpt2_config(name)
    return f"gpt2/{name}/model.safetensors"


def download_gpt2_weights(name: str) -> Path:
    """Path to a verified (sha256) model.safetensors of GPT-2 size `name`, downloading it if needed."""
    url = weights_url(name)  # validates the name
    weights = WEIGHT_FILES[name]
    return assets.fetch(
        weights_relpath(name),
        url,
        sha256=weights.sha256,
        size=weights.size,
        desc=f"{name} weights",
    )


def _file_layout(model: GPTModel) -> dict[str, tuple[list[torch.Tensor], bool]]:
    """For each tensor of a Hugging Face GPT-2 file: the model tensors it fills, and whether it
    is a Conv1D weight ((in, out); several side by side for the fused query/key/value)."""
    layout = {
        "wte.weight": ([model.tok_emb.weight], False),
        "wpe.weight": ([model.pos_emb.weight], False),
        "ln_f.weight": ([model.final_norm.weight], False),
        "ln_f.bias": ([model.final_norm.bias], False),
    }
    for i, block in enumerate(model.trf_blocks):
        att, ff = block.att, block.ff.layers
        pieces = {
            "ln_1": [block.norm1],
            "attn.c_attn": [att.W_query, att.W_key, att.W_value],
            "attn.c_proj": [att.out_proj],
            "ln_2": [block.norm2],
            "mlp.c_fc": [ff[0]],
            "mlp.c_proj": [ff[2]],
        }
        for piece, modules in pieces.items():
            conv = isinstance(modules[0], nn.Linear)
            layout[f"h.{i}.{piece}.weight"] = ([m.weight for m in modules], conv)
            if modules[0].bias is not None:
                layout[f"h.{i}.{piece}.bias"] = ([m.bias for m in modules], False)
    return layout


def _expected_shape(targets: list[torch.Tensor], conv: bool) -> tuple[int, ...]:
    if conv:
        return (targets[0].shape[1], sum(t.shape[0] for t in targets))
    return (sum(t.shape[0] for t in targets), *targets[0].shape[1:])


def _describe(n_layers: int, emb_dim: int) -> str:
    for name, (e, layers, _) in _SIZES.items():
        if (e, layers) == (emb_dim, n_layers):
            return f"{name} ({n_layers} blocks, {emb_dim}-dim)"
    return f"a {n_layers}-block, {emb_dim}-dim GPT-2"


def _likely_cause(shapes: dict[str, tuple[int, ...]], model: GPTModel) -> str:
    blocks = [int(m.group(1)) for k in shapes if (m := re.match(r"h\.(\d+)\.", k))]
    in_file = _describe(max(blocks, default=-1) + 1, shapes["wte.weight"][-1])
    in_model = _describe(len(model.trf_blocks), model.tok_emb.embedding_dim)
    if in_file != in_model:
        return (
            f"the file holds {in_file} but the model is {in_model}, so build the model from "
            "the matching gpt2_config(...)"
        )
    return (
        f"file and model are both {in_model}, so compare the model's config with GPT-2's "
        f"(vocab_size 50257, context_length 1024, qkv_bias True)"
    )


def _read_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{GPT-2 name: (name in the file, shape)} from a safetensors header, without the tensors."""
    try:
        with safe_open(path, framework="pt") as f:
            names = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path.name} is not a readable safetensors file ({err}); download it again."
        ) from err
    shapes = {}
    for key, shape in names.items():
        name = key.removeprefix("transformer.")
        # attn.bias / attn.masked_bias are causal-mask buffers, lm_head is wte again (tied)
        if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias|lm_head\.weight", name):
            continue
        shapes[name] = (key, shape)
    return shapes


def _match(model: GPTModel, path: Path) -> list[tuple[str, list[torch.Tensor], bool]]:
    """(name in the file, model tensors, conv) for every tensor; a clear ValueError on any mismatch."""
    if any(isinstance(m, LinearWithLoRA) for m in model.modules()):
        raise ValueError(
            "The model already has LoRA layers; load the pretrained weights first, then call "
            "replace_linear_with_lora."
        )
    found = _read_shapes(path)
    if "wte.weight" not in found:
        raise ValueError(
            f"{path.name} is not a GPT-2 checkpoint: it has no wte.weight (token embedding) "
            f"among its tensors {sorted(found)[:4]}; use the model.safetensors of "
            "openai-community/gpt2 (or gpt2-medium, -large, -xl)."
        )
    shapes = {name: shape for name, (_, shape) in found.items()}
    layout = _file_layout(model)
    missing = [name for name in layout if name not in found]
    unexpected = [name for name in found if name not in layout]
    if missing or unexpected:
        raise ValueError(
            f"{path.name} does not fit this model: {len(missing)} tensor(s) missing "
            f"{missing[:3]} and {len(unexpected)} unexpected {unexpected[:3]}; "
            f"{_likely_cause(shapes, model)}."
        )
    for name, (targets, conv) in layout.items():
        if shapes[name] != _expected_shape(targets, conv):
            raise ValueError(
                f"{name} has shape {shapes[name]} in {path.name} but this model needs "
                f"{_expected_shape(targets, conv)}: {_likely_cause(shapes, model)}."
            )
    return [(found[name][0], targets, conv) for name, (targets, conv) in layout.items()]


@torch.no_grad()
def load_gpt2_safetensors(model: GPTModel, path: str | os.PathLike) -> None:
    """Copy a Hugging Face GPT-2 model.safetensors into `model` (in place).

    Keys may carry the "transformer." prefix or not. Conv1D weights (in, out) are
    transposed to nn.Linear's (out, in); the fused c_attn is split into W_query, W_key,
    W_value. out_head stays tied to tok_emb (a classifier head from to_classifier is left
    as it is). Raises FileNotFoundError when `path` does not exist, ValueError naming the
    tensor when names or shapes do not fit.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; download_gpt2_weights(name) (e.g. 'gpt2-small') fetches "
            "GPT-2's model.safetensors and returns the path to pass here."
        )
    plan = _match(model, path)
    with safe_open(path, framework="pt") as f:
        for key, targets, conv in plan:
            tensor = f.get_tensor(key)
            sizes = [t.shape[0] for t in targets]
            for target, piece in zip(
                targets, tensor.split(sizes, dim=1 if conv else 0), strict=True
            ):
                target.copy_(piece.T if conv else piece)


def gpt2_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The base weights of `model` under Hugging Face GPT-2's names: load_gpt2_safetensors reversed.

    Keys as in transformers' GPT2Model ("wte.weight", "h.0.attn.c_attn.weight", ...): nn.Linear
    weights (out, in) become Conv1D's (in, out), W_query, W_key and W_value are fused into
    c_attn. Copies, on the CPU. A model without q/k/v biases (qkv_bias False) gets zeros there,
    which computes the same. Raises ValueError when a block layer is not a plain nn.Linear
    (LoRA, DoRA, 4-bit): pass the base model, or merge_lora(model) first to keep what LoRA
    learned.
    """
    for name, module in model.trf_blocks.named_modules():
        if is_adapter(module) or type(module).__name__.startswith("Quantized"):
            raise ValueError(
                f"trf_blocks.{name} is a {type(module).__name__}, which transformers' GPT-2 has "
                "no place for; pass the base model, or merge_lora(model) first to keep what "
                "LoRA learned."
            )
    state = {}
    for name, (tensors, conv) in _file_layout(model).items():
        joined = torch.cat(
            [t.detach().T if conv else t.detach() for t in tensors], dim=1 if conv else 0
        )
        state[name] = joined.to("cpu", copy=True).contiguous()
    for i, block in enumerate(model.trf_blocks):
        if block.att.W_query.bias is None:
            width = sum(
                m.weight.shape[0] for m in (block.att.W_query, block.att.W_key, block.att.W_value)
            )
            state[f"h.{i}.attn.c_attn.bias"] = torch.zeros(
                width, dtype=block.att.W_query.weight.dtype
            )
    return state


# --------------------------------------------------------------------------- fallback


class GPT2Source(NamedTuple):
    """What load_gpt2_or_fallback returned: pretrained GPT-2 or the small random fallback."""

    name: str
    pretrained: bool
    description: str


def _show(path: Path) -> str:
    """A path for printing: relative to the repository when inside it, else with ~ for home."""
    path = path.resolve()
    for base, prefix in ((assets.checkout(), ""), (Path.home(), "~/")):
        if base and path.is_relative_to(base):
            return prefix + path.relative_to(base).as_posix()
    return str(path)


def _banner(name: str, reason: str, n_params: int) -> str:
    cfg, weights = FALLBACK_CONFIG, WEIGHT_FILES[name]
    size = f"{weights.size / 1e6:,.0f} MB " if weights.size else ""
    unset = "unset LORA_PRETRAINED and " if os.environ.get("LORA_PRETRAINED") == "0" else ""
    lines = [
        f"FALLBACK: using a small, RANDOMLY INITIALISED GPT-2, not the pretrained {name}.",
        f"Why: {reason}",
        f"What: the same GPTModel code with {cfg['n_layers']} blocks, {cfg['emb_dim']}-dim "
        f"embeddings and GPT-2's {cfg['vocab_size']:,}-token vocabulary ({n_params:,} "
        "parameters). It has learned nothing, so the text it writes is gibberish and what it "
        f"learns in fine-tuning is not what {name} would learn.",
        f"Real weights: {unset}run this with internet access (it downloads {size}from "
        f"{weights_url(name)} to {_show(assets.data_dir() / weights_relpath(name))}), or put "
        f"that file there by hand, or in a folder on LORA_ASSETS_PATH as {weights_relpath(name)}.",
    ]
    wrap = textwrap.TextWrapper(
        78, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )
    rule = "!" * 78
    return "\n".join([rule, *(wrap.fill(line) for line in lines), rule])


def load_gpt2_or_fallback(
    name: str = "gpt2-small", *, seed: int = 123
) -> tuple[GPTModel, GPT2Source]:
    """Pretrained GPT-2 `name` (cached, on LORA_ASSETS_PATH, or downloaded), in eval mode on CPU.

    When that is impossible (offline, LORA_PRETRAINED=0, a failed download) it prints a
    banner saying why and returns GPTModel(FALLBACK_CONFIG), randomly initialised with `seed`.
    """
    cfg = gpt2_config(name)
    if os.environ.get("LORA_PRETRAINED") == "0":
        reason = (
            "LORA_PRETRAINED=0 is set (the tests set it so that notebook outputs are reproducible)."
        )
    else:
        try:
            path = download_gpt2_weights(name)
        except AssetError as err:
            reason = str(err)
        else:
            with torch.device("meta"):  # no time spent on random weights about to be replaced
                model = GPTModel(cfg)
            model.to_empty(device="cpu")
            model.out_head.weight = model.tok_emb.weight  # to_empty unties
            load_gpt2_safetensors(model, path)
            source = GPT2Source(name, True, f"pretrained {name} from {_show(path)}")
            return model.eval(), source
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTModel(FALLBACK_CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    print(_banner(name, reason, n_params))
    description = f"small randomly initialised GPT-2 (seed {seed}) standing in for {name}"
    return model.eval(), GPT2Source("gpt2-fallback", False, description)


# -------------------------------------------------------------------------- tokenizer

#: GPT-2's BPE files: relative path -> (canonical URL, sha256), as tiktoken verifies them.
TOKENIZER_FILES = {
    "gpt2-tokenizer/encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "gpt2-tokenizer/vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding, built from local copies of its two files when they exist.

    tiktoken caches the files under TIKTOKEN_CACHE_DIR, named by the SHA-1 of their URL.
    This puts verified copies there (default: data_dir()/tiktoken-cache), found via
    lora_helpers.assets (LORA_ASSETS_PATH, the cache, else a download), so tiktoken never
    needs the network itself.
    """
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or assets.data_dir() / "tiktoken-cache")
    for relpath, (url, sha256) in TOKENIZER_FILES.items():
        cached = cache / hashlib.sha1(url.encode()).hexdigest()
        if cached.is_file() and assets.sha256_of(cached) == sha256:
            continue
        source = assets.fetch(relpath, url, sha256=sha256, desc="GPT-2 tokenizer")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, cached.with_name(cached.name + ".part"))
            os.replace(cached.with_name(cached.name + ".part"), cached)
        except OSError as err:
            raise AssetError(
                f"Could not write the tokenizer cache {cached} ({err.strerror or err}); set "
                "TIKTOKEN_CACHE_DIR or LORA_DATA_DIR to a writable folder."
            ) from err
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return tiktoken.get_encoding("gpt2")


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> torch.Tensor:
    """Text -> token ids of shape (1, tokens), with <|endoftext|> allowed."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(ids: torch.Tensor | list[int], tokenizer: tiktoken.Encoding) -> str:
    """Token ids of shape (tokens,) or (1, tokens), or a list of ints (tokenizer.encode's) -> text.

    Raises ValueError for a batch of more than one sequence.
    """
    if isinstance(ids, list | tuple):
        return tokenizer.decode(list(ids))
    if ids.dim() == 2 and ids.shape[0] != 1:
        raise ValueError(
            f"Got a batch of {ids.shape[0]} sequences; decode one row at a time: ids[i]."
        )
    return tokenizer.decode(ids.flatten().tolist())


# ------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Extend token ids (batch, tokens) by up to max_new_tokens -> (batch, tokens + new).

    temperature 0 picks the most likely token (greedy, and top_k is then ignored); above 0
    it samples from softmax(logits / temperature), restricted to the top_k most likely
    tokens if given. The model sees at most its context_length last tokens. With eos_id, a
    sequence that emitted it is padded with it, and generation stops once every sequence
    has. Raises ValueError for an empty prompt, a negative max_new_tokens, a temperature
    below 0 or NaN, or a top_k below 1.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}.")
    if idx.shape[1] == 0:
        raise ValueError(
            "The prompt is empty (0 tokens); give at least one token, e.g. "
            'text_to_token_ids("<|endoftext|>", tokenizer).'
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = temperature.item()
    if not (isinstance(temperature, numbers.Real) and temperature >= 0):  # NaN fails too
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None:
        positive_int("top_k", top_k, "or None, to sample from every token")
    context_length = model.pos_emb.num_embeddings
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    with evaluating(model):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -context_length:])[:, -1, :]  # (batch, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            if eos_id is not None:
                next_id = next_id.masked_fill(done.unsqueeze(1), eos_id)
                done |= next_id.squeeze(1) == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None and done.all():
                break
    return idx


# ---------------------------------------------------------------------- classification


def to_classifier(model: GPTModel, n_classes: int) -> GPTModel:
    """Replace the LM head by nn.Linear(emb_dim, n_classes) (with bias, freshly initialised); returns `model`.

    The model then maps (batch, tokens) -> (batch, tokens, n_classes); tok_emb keeps its weight.
    Raises ValueError for n_classes below 1 or an out_head that carries LoRA or DoRA (it
    would be lost).
    """
    positive_int("n_classes", n_classes)
    if is_adapter(model.out_head):
        raise ValueError(
            "model.out_head carries LoRA, which to_classifier would drop; call to_classifier "
            "before adding LoRA, or leave out_head out of the LoRA targets."
        )
    weight = model.tok_emb.weight
    model.out_head = nn.Linear(
        model.tok_emb.embedding_dim, n_classes, device=weight.device, dtype=weight.dtype
    )
    return model


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Set the model's dropout probability to `p`, in place; returns `model`.

    Covers each nn.Dropout and the attention weights' dropout (MultiHeadAttention.dropout),
    and a GPTModel's cfg["drop_rate"]; a LoRA layer's own dropout (replace_linear_with_lora's
    `dropout`) is the adapter's setting and stays as it is. The GPT-2 configs set 0.1 (the
    reference's chapter 4, transformers' GPT2Config); the reference fine-tunes with 0.0
    (Raschka, ch. 6 and appendix E, BASE_CONFIG). Raises ValueError, changing nothing,
    unless p is a number in [0, 1).
    """
    p = dropout_probability(p)
    adapters = {
        id(m) for layer in model.modules() if isinstance(layer, LoRALayer) for m in layer.modules()
    }
    for module in model.modules():
        if id(module) in adapters:
            continue
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, MultiHeadAttention):
            module.dropout = p
    if isinstance(model, GPTModel):
        model.cfg["drop_rate"] = p
    return model


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_ids(model: nn.Module, idx: torch.Tensor) -> None:
    """TypeError/ValueError unless idx is a (batch, tokens >= 1) tensor; for a GPTModel, of
    integer ids in [0, vocab_size) (on CUDA an id out of range is a device-side assert)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(
            f"idx must be a tensor of token ids (batch, tokens), got a {type(idx).__name__}; "
            "pass torch.tensor(ids), with .unsqueeze(0) for one sequence."
        )
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(
            f"idx must have shape (batch, tokens) with at least one token, got shape "
            f"{tuple(idx.shape)}; add a batch dimension with ids.unsqueeze(0)."
        )
    if not isinstance(model, GPTModel) or not idx.numel():
        return
    if idx.dtype not in (torch.long, torch.int):
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}; pass idx.long().")
    low, high = (int(v) for v in torch.aminmax(idx))
    vocab = model.tok_emb.num_embeddings
    if low < 0 or high >= vocab:
        raise ValueError(
            f"Token ids must be in [0, {vocab}) for this model, got ids from {low} to {high}; "
            "encode the text with the model's tokenizer (get_tokenizer())."
        )


def _lengths_tensor(lengths: object, idx: torch.Tensor) -> torch.Tensor:
    """`lengths` (a tensor, array or list of integers) as a long tensor (batch,) on idx's
    device with values in 1..tokens; TypeError or ValueError otherwise."""
    try:
        found = torch.as_tensor(lengths, device=idx.device)
    except (TypeError, ValueError, RuntimeError):
        found = None
    if found is None or found.dtype not in _INTEGER_DTYPES:
        what = f"a {type(lengths).__name__}" if found is None else f"dtype {found.dtype}"
        raise TypeError(
            f"lengths must be a tensor of integers (torch.long), got {what}; pass "
            "torch.tensor(lengths)."
        )
    found = found.long()
    if found.shape != (idx.shape[0],) or (
        found.numel() and (found.min() < 1 or found.max() > idx.shape[1])
    ):
        raise ValueError(
            f"lengths must have shape ({idx.shape[0]},) with values in 1..{idx.shape[1]}, "
            f"got {found.tolist()}."
        )
    return found


def classify_logits(
    model: GPTModel, idx: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Class logits (batch, n_classes) read at the last token of each sequence in idx (batch, tokens).

    lengths (batch,): the number of real tokens per row when rows are right-padded; the
    last real token is then read instead of the last position.
    Checks before the forward pass: TypeError unless idx is a tensor (of integers, for a
    GPTModel) and lengths, if given, integers (a tensor, array or list); ValueError unless
    idx has shape (batch, tokens) with tokens >= 1 and (for a GPTModel) ids in
    [0, vocab_size), and lengths shape (batch,) with values in 1..tokens.
    """
    _check_ids(model, idx)
    if lengths is not None:
        lengths = _lengths_tensor(lengths, idx)
    logits = model(idx)  # (batch, tokens, n_classes)
    if lengths is None:
        return logits[:, -1, :]
    return logits[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
