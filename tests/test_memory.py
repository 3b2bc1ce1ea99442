"""lora_helpers.memory: the bytes per number against the papers, the meta-device count against
real CPU runs and the committed CPU measurement, and notebook 09's verdicts on a 7B table."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lora_helpers import bench, memory
from lora_helpers.gpt2 import GPTModel
from lora_helpers.lora import RankWarning, mark_only_lora_as_trainable, replace_linear_with_lora

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PARAMETERS = 6_738_415_616  # Llama-2-7B, as claim 7 counts it


# ------------------------------------------------------------------ bytes per number


def test_full_fine_tuning_costs_16_bytes_a_weight_in_float32_and_in_mixed_precision():
    assert memory.per_number("full", "float32", "trained") == (4, 0, 4, 8)
    # ZeRO section 3.1: fp16 weights and gradients (2 + 2), then K = 12 for Adam's fp32 copy,
    # momentum and variance (4 + 4 + 4)
    assert memory.per_number("full", "bf16", "trained") == (2, 4, 2, 8)
    assert sum(memory.per_number("full", "float32", "trained")) == 16
    assert sum(memory.per_number("full", "bf16", "trained")) == 16


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapters_train_in_float32_on_a_bf16_base(mode):
    assert memory.per_number(mode, "bf16", "trained") == (4, 0, 4, 8)
    assert memory.per_number(mode, "bf16", "frozen") == (2, 0, 0, 0)


def test_qlora_stores_a_weight_in_4_127_bits():
    """QLoRA section 3: constants of 32 / 64 = 0.5 bits a weight, double quantization
    8 / 64 + 32 / (64 * 256) = 0.127 bits, a saving of 0.373."""
    assert memory.NF4_CONSTANT_BITS == pytest.approx(0.127, abs=5e-4)
    assert 32 / 64 - memory.NF4_CONSTANT_BITS == pytest.approx(0.373, abs=5e-4)
    assert memory.per_number("qlora", "bf16", "quantized").weight * 8 == pytest.approx(4.127, 1e-3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: memory.per_number("prefix", "bf16", "trained"), "Unknown mode 'prefix'"),
        (lambda: memory.per_number("full", "fp16", "trained"), "Unknown precision 'fp16'"),
        (lambda: memory.per_number("qlora", "float32", "frozen"), "use precision='bf16'"),
        (lambda: memory.per_number("lora", "bf16", "quantized"), "with mode='qlora'"),
        (lambda: memory.build("llama-2-13b", "full", "bf16"), "Unknown size 'llama-2-13b'"),
        (
            lambda: memory.breakdowns(["gpt2-small"], [("full", "bf16")], [0]),
            "batch must be a positive integer",
        ),
        (lambda: memory.breakdowns("gpt2-small", [("full", "bf16")], [1]), r"\['gpt2-small'\]"),
        (lambda: memory.breakdowns(["gpt2-small"], ("full", "bf16"), [1]), "pairs"),
        (lambda: memory.breakdowns(["gpt2-small"], [("full", "bf16")], 8), r"\(1, 8\)"),
        (lambda: memory.breakdowns(["gpt2-small"], [("full", "bf16")], ()), "non-empty"),
        (lambda: memory.activation_bytes("gpt2-small", 1, 16), "memory.build"),
        (lambda: memory.model_states("gpt2-small", "full", "bf16"), "memory.build"),
    ],
)
def test_unknown_settings_are_refused_naming_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("batch", ["8", 2.0, True, None, 0])
def test_a_batch_that_is_not_a_positive_integer_is_refused(batch):
    model = memory.build("gpt2-small", "full", "bf16")
    with pytest.raises(ValueError, match=r"batch must be a positive integer, got .*; e.g. batch=8"):
        memory.activation_bytes(model, batch, 16)


@pytest.mark.parametrize(
    ("built", "asked", "message"),
    [
        (("lora", "bf16"), ("lora", "float32"), "precision='float32' does not match"),
        (("lora", "bf16"), ("full", "bf16"), "mode='full' does not match"),
        (("full", "bf16"), ("qlora", "bf16"), "mode='qlora' does not match"),
        (("full", "bf16"), ("full", "float32"), "precision='float32' does not match"),
    ],
)
def test_a_count_for_another_mode_or_precision_than_the_models_is_refused(built, asked, message):
    model = memory.build("gpt2-small", *built)
    with pytest.raises(ValueError, match=message):
        memory.model_states(model, *asked)


def test_verdicts_true_refused_without_activations_and_for_a_bad_claim():
    model = memory.build("gpt2-small", "full", "bf16")
    states = memory.model_states(model, "full", "bf16")
    with pytest.raises(ValueError, match="no activations"):
        memory.verdict(8, states, 1, 16)
    for claim in (-1, 0, "8", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive, finite number of GB"):
            memory.verdict(claim, states, 1, 16)
    counted = states._replace(activations=memory.activation_bytes(model, 1, 16))
    assert memory.verdict(3, counted, 1, 16).startswith("true: 3 GB holds")
    assert memory.verdict(np.float32(3), counted, 1, 16).startswith("true: 3 GB holds")
    assert memory.verdict(0.1, counted, 1, 16).startswith("corrected")


# ------------------------------------------------------------------- the 7B shape


@pytest.fixture(scope="module")
def llama_7b():
    """Notebook 09's 7B breakdowns at batch 1 x 512 tokens: {"mode precision": Memory}."""
    results = memory.breakdowns(["llama-2-7b"], memory.SCHEMES, [1], 512)
    return {
        f"{mode} {precision}": by_batch[1] for (_, mode, precision), by_batch in results.items()
    }


def test_the_7b_shape_has_llama_2_7bs_parameters_and_16_bytes_each_in_full_fine_tuning(llama_7b):
    model = memory.build("llama-2-7b", "full", "bf16")
    assert sum(p.numel() for p in model.parameters()) == LLAMA_PARAMETERS
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE's frequencies
    assert llama_7b["full bf16"].model_states == 16 * LLAMA_PARAMETERS + buffers
    assert llama_7b["full bf16"].weights == 2 * LLAMA_PARAMETERS + buffers


def test_qlora_quantizes_exactly_the_block_linears_and_keeps_the_rest_in_bf16(llama_7b):
    d, mlp, layers, vocab = 4096, 11008, 32, 32000
    linears = layers * (4 * d * d + 3 * d * mlp)
    rest = LLAMA_PARAMETERS - linears  # embeddings, LM head, RMSNorm weights
    assert rest == 2 * vocab * d + (2 * layers + 1) * d
    adapters = layers * 16 * (4 * 2 * d + 3 * (d + mlp))  # rank 16 on every block linear
    model = memory.build("llama-2-7b", "qlora", "bf16")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapters
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights = linears * (4 + memory.NF4_CONSTANT_BITS) / 8 + 2 * rest + 4 * adapters + buffers
    qlora = llama_7b["qlora bf16"]
    assert qlora.weights == pytest.approx(weights, rel=1e-12)
    assert (qlora.master, qlora.gradients, qlora.adamw) == (0, 4 * adapters, 8 * adapters)


# -------------------------------------------------------------- activations, measured


def test_activations_grow_linearly_with_the_batch():
    model = memory.build("gpt2-small", "full", "bf16")
    one, two, three, eight = (memory.activation_bytes(model, b, 64) for b in (1, 2, 3, 8))
    assert two - one == three - two > 0
    assert eight == one + 7 * (two - one)


@pytest.mark.parametrize("size", ["gpt2-small", "llama-2-7b"])
def test_lora_keeps_no_more_activations_than_full_fine_tuning_in_float32(size):
    full, lora = (
        memory.activation_bytes(memory.build(size, mode, "float32"), 1, 128)
        for mode in ("full", "lora")
    )
    assert lora <= full


def test_in_bf16_lora_keeps_more_because_each_adapter_keeps_a_float32_copy_of_its_input():
    full = memory.activation_bytes(memory.build("llama-2-7b", "full", "bf16"), 1, 128)
    lora_model = memory.build("llama-2-7b", "lora", "bf16")
    assert memory.activation_bytes(lora_model, 1, 128) > full
    lora_model.to(torch.bfloat16)  # bf16 adapters: no cast, no copy
    assert memory.activation_bytes(lora_model, 1, 128) <= full


def test_the_count_includes_the_float32_log_probabilities_of_the_loss():
    """cross_entropy keeps its float32 log-softmax, (batch, tokens, vocabulary) x 4 bytes."""
    model = memory.build("gpt2-small", "lora", "bf16")
    with_head = memory.activation_bytes(model, 1, 64)
    model.out_head = torch.nn.Linear(768, 10, bias=False, device="meta", dtype=torch.bfloat16)
    model.out_head.requires_grad_(False)  # as the tied head it replaces
    assert with_head - memory.activation_bytes(model, 1, 64) == 64 * (50257 - 10) * 4


@pytest.mark.parametrize(
    ("size", "fused"), [("gpt2-small", True), ("gpt2-small", False), ("llama-2-7b", True)]
)
def test_breakdowns_from_one_and_two_blocks_equal_the_count_of_the_whole_model(size, fused):
    schemes = [("full", "float32"), ("lora", "bf16"), ("qlora", "bf16")]
    extended = memory.breakdowns([size], schemes, [1, 3], 32, fused_attention=fused)
    for mode, precision in schemes:
        model = memory.build(size, mode, precision)
        assert len(memory.blocks(model)) == memory.depth(size)
        states = memory.model_states(model, mode, precision)
        for batch in (1, 3):
            counted = memory.activation_bytes(model, batch, 32, fused_attention=fused)
            assert extended[size, mode, precision][batch] == states._replace(activations=counted)


def test_breakdowns_takes_any_iterable_of_batches_and_warns_once_about_a_large_rank():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = memory.breakdowns(
            ["gpt2-small"], [("lora", "bf16")], (b for b in [1]), 8, rank=800
        )
    assert list(results["gpt2-small", "lora", "bf16"]) == [1]
    rank_warnings = [w for w in caught if issubclass(w.category, RankWarning)]
    assert len(rank_warnings) == 1
    assert "some linear layers of gpt2-small" in str(rank_warnings[0].message)
    with pytest.raises(ValueError, match="results is empty"):
        memory.format_breakdowns({}, 8)


@pytest.mark.parametrize(
    ("n_blocks", "message"),
    [
        (0, "n_blocks must be a positive integer, got 0; e.g. n_blocks=2"),
        (13, "from 1 to 12 .the blocks of gpt2-small., got 13"),
        (2.0, "positive integer, got 2.0; e.g. n_blocks=2"),
        (True, "positive integer, got True"),
    ],
)
def test_a_model_of_fewer_blocks_is_asked_for_with_a_number_of_its_blocks(n_blocks, message):
    assert len(memory.blocks(memory.build("gpt2-small", "lora", "bf16", n_blocks=2))) == 2
    with pytest.raises(ValueError, match=message):
        memory.build("gpt2-small", "full", "bf16", n_blocks=n_blocks)


@pytest.mark.parametrize("size", [None, "gpt2", 12])
def test_depth_names_every_size_for_an_unknown_one(size):
    with pytest.raises(ValueError, match=r"'gpt2-xl', 'llama-2-7b'\]"):
        memory.depth(size)


# ---------------------------------------------- the meta-device count against real runs


def tiny_gpt(device: str, dtype: torch.dtype, lora: bool, drop_rate: float) -> GPTModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTModel({**bench.TINY_CONFIG, "drop_rate": drop_rate}).to(dtype)
    if lora:
        mark_only_lora_as_trainable(replace_linear_with_lora(model.trf_blocks, 8, 8))
    return model.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
def test_the_meta_count_equals_a_real_cpu_forward(dtype, lora, drop_rate):
    """Without dropout the CPU runs its fused attention kernel, which the stand-in counts; with
    dropout it takes the unfused path, which the meta device takes too. One difference: for
    bf16 input, LayerNorm's mean and 1/std are float32 on the meta device (as on a GPU), bf16
    on the CPU: 2 bytes more for each of 2 numbers per token in each of the 5 LayerNorms."""
    batch, tokens = 2, 16
    cpu = memory.activation_bytes(tiny_gpt("cpu", dtype, lora, drop_rate), batch, tokens)
    meta = tiny_gpt("meta", dtype, lora, drop_rate)
    counted = memory.activation_bytes(meta, batch, tokens, fused_attention=drop_rate == 0)
    layer_norms = 2 * bench.TINY_CONFIG["n_layers"] + 1
    assert counted - cpu == (layer_norms * 2 * batch * tokens * 2 if dtype == torch.bfloat16 else 0)


def small_llama_config(
    hidden: int, intermediate: int, layers: int, heads: int, vocab: int
) -> transformers.LlamaConfig:
    """A transformers Llama of this shape, set up as memory builds Llama-2-7B's (no KV cache,
    SDPA attention)."""
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        use_cache=False,
        attn_implementation="sdpa",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_meta_count_equals_a_real_cpu_forward_of_a_small_llama(dtype):
    config = small_llama_config(hidden=64, intermediate=172, layers=2, heads=4, vocab=100)
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(dtype).train()
        mark_only_lora_as_trainable(replace_linear_with_lora(model.model.layers, 8, 8))
        counts.append(memory.activation_bytes(model, 3, 16))
    assert counts[0] == counts[1]


def test_transformers_builds_no_mask_for_a_batch_without_padding(monkeypatch):
    """What the meta count assumes (it cannot read position values): checked on a CPU."""
    from transformers.models.llama import modeling_llama

    masks = []
    real = modeling_llama.create_causal_mask
    monkeypatch.setattr(
        modeling_llama, "create_causal_mask", lambda **kw: masks.append(real(**kw)) or masks[-1]
    )
    config = small_llama_config(hidden=32, intermediate=64, layers=1, heads=2, vocab=50)
    transformers.LlamaForCausalLM(config)(torch.zeros(2, 8, dtype=torch.long))
    assert masks == [None]


def test_the_committed_cpu_measurement_is_reproduced_to_the_byte():
    """Notebook 09: the CPU benchmark's memory (counted during a real step, float32, its
    unfused attention because of dropout) equals the meta-device count, part by part."""
    result = json.loads((ROOT / "results" / "bench-cpu-gpt2-small.json").read_text())
    batch, tokens = result["batch"], result["tokens"]
    computed = memory.breakdowns(
        ["gpt2-small"],
        [("full", "float32"), ("lora", "float32")],
        [batch],
        tokens,
        rank=result["rank"],
        fused_attention=False,
    )
    for (_, mode, _), by_batch in computed.items():
        parts = by_batch[batch]
        measured = result["modes"][mode]["memory_breakdown_computed"]
        assert (parts.weights, parts.gradients, parts.adamw, parts.activations) == (
            measured["weights"],
            measured["gradients"],
            measured["adamw_states"],
            measured["activations"],
        )
        assert parts.total == result["modes"][mode]["peak_memory_bytes"]


# ------------------------------------------------------------- notebook 09's verdicts


def test_full_fine_tuning_of_7b_needs_over_twice_40_gb_before_any_activation(llama_7b):
    for precision in memory.PRECISIONS:
        states = llama_7b[f"full {precision}"].model_states
        assert states > 2 * memory.ARTICLE_GB["full"] * 1e9
    verdict = memory.verdict(memory.ARTICLE_GB["full"], llama_7b["full bf16"], 1, 512)
    assert verdict == "corrected: the weights, gradients and AdamW states alone are 107.8 GB"


def test_lora_on_a_bf16_7b_base_exceeds_12_gb_with_its_weights_alone(llama_7b):
    assert llama_7b["lora bf16"].weights > memory.ARTICLE_GB["lora"] * 1e9
    verdict = memory.verdict(memory.ARTICLE_GB["lora"], llama_7b["lora bf16"], 1, 512)
    assert verdict == "corrected: the weights alone are 13.6 GB"


def test_qlora_of_7b_fits_8_gb_only_below_one_512_token_sequence(llama_7b):
    qlora = llama_7b["qlora bf16"]
    claimed = memory.ARTICLE_GB["qlora"] * 1e9
    assert qlora.model_states < claimed < qlora.total
    verdict = memory.verdict(memory.ARTICLE_GB["qlora"], qlora, 1, 512)
    assert verdict.startswith("true only in a stated context: 8 GB leaves 3.5 GB")
    assert "0.77 of what batch 1 x 512 tokens keeps (4.6 GB)" in verdict
