"""lora_helpers.gpt2: configs, exact counts, loading Hugging Face files, fallback, tokenizer, generation."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tiktoken.load
import tiktoken.registry
import torch
from _http_server import FileServer
from safetensors.torch import save_file
from torch import nn

from lora_helpers import gpt2
from lora_helpers.assets import AssetError
from lora_helpers.gpt2 import (
    FALLBACK_CONFIG,
    GPTModel,
    classify_logits,
    generate,
    get_tokenizer,
    gpt2_config,
    load_gpt2_or_fallback,
    load_gpt2_safetensors,
    parameter_breakdown,
    text_to_token_ids,
    to_classifier,
    token_ids_to_text,
)
from lora_helpers.lora import RankWarning, count_parameters, freeze, replace_linear_with_lora

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "assets" / "gpt2-tokenizer"
needs_shared_tokenizer = pytest.mark.skipif(
    not (SHARED_TOKENIZER / "encoder.json").is_file(),
    reason="../shared/assets/gpt2-tokenizer is absent (offline tokenizer copies)",
)

# A tiny GPT-2 in the published format: GPT-2's vocabulary and context, 2 blocks of width 32.
TINY = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}
SMALL = {**TINY, "vocab_size": 60, "context_length": 16}  # for generation and heads


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """(transformers model, {"save_pretrained": path, "openai-style": path}) of one random tiny GPT-2.

    "openai-style" is the layout of openai-community/gpt2's file: no "transformer." prefix,
    causal-mask buffers h.N.attn.bias, and here also a tied lm_head.weight copy.
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=TINY["vocab_size"],
        n_positions=TINY["context_length"],
        n_embd=TINY["emb_dim"],
        n_layer=TINY["n_layers"],
        n_head=TINY["n_heads"],
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that a mix-up shows
        for param in hf.parameters():
            param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder, safe_serialization=True)
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    for i in range(TINY["n_layers"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
    save_file(state, folder / "openai-style.safetensors")
    return hf, {
        "save_pretrained": folder / "model.safetensors",
        "openai-style": folder / "openai-style.safetensors",
    }


def _tiny_model(cfg=TINY, seed=1) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


# ------------------------------------------------------------------ configs and counts


def test_gpt2_config_returns_fresh_dicts_and_rejects_unknown_names():
    cfg = gpt2_config("gpt2-small")
    assert cfg == {
        "vocab_size": 50257,
        "context_length": 1024,
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.1,
        "qkv_bias": True,
    }
    cfg["emb_dim"] = 1
    assert gpt2_config("gpt2-small")["emb_dim"] == 768
    with pytest.raises(ValueError, match="'gpt2-small', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'"):
        gpt2_config("gpt2")


def test_model_config_must_be_complete():
    with pytest.raises(ValueError, match=r"lacks \['qkv_bias'\]"):
        GPTModel({k: v for k, v in TINY.items() if k != "qkv_bias"})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_exact_parameter_counts_of_the_four_sizes(name, expected):
    with torch.device("meta"):
        model = GPTModel(gpt2_config(name))
    assert model.out_head.weight is model.tok_emb.weight  # tied: counted once
    assert count_parameters(model).total == expected
    assert sum(parameter_breakdown(model).values()) == expected
    transformers = pytest.importorskip("transformers")  # an independent implementation agrees
    emb, layers, heads = (gpt2_config(name)[k] for k in ("emb_dim", "n_layers", "n_heads"))
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=emb, n_layer=layers, n_head=heads)
        )
    assert sum(p.numel() for p in hf.parameters()) == expected


def test_parameter_breakdown_of_gpt2_small():
    with torch.device("meta"):
        model = GPTModel(gpt2_config("gpt2-small"))
    parts = parameter_breakdown(model)
    assert parts["token embedding"] == 50257 * 768
    assert parts["position embedding"] == 1024 * 768
    assert parts["attention (Q, K, V, out)"] == 12 * 4 * (768 * 768 + 768)
    assert parts["feed-forward"] == 12 * (2 * 768 * 3072 + 3072 + 768)
    assert parts["layer norms"] == (2 * 12 + 1) * 2 * 768
    assert parts["output head (untied part)"] == 0
    replace_linear_with_lora(model, 4, 4, ["W_query"])
    assert parameter_breakdown(model)["LoRA (A, B)"] == 12 * 4 * (768 + 768)


def test_the_classic_figures_124441346_and_2666528():
    with torch.device("meta"):
        model = to_classifier(GPTModel(gpt2_config("gpt2-small")), 2)
    assert count_parameters(model).trainable == 124_441_346
    rank = 16
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sum(rank * (m.in_features + m.out_features) for _, m in linears) == 2_666_528
    # the reference appendix's exact call, on every linear layer: rank 16 > 2 on the head
    # is allowed (as in PEFT) with one warning that names it
    freeze(model)
    with pytest.warns(RankWarning, match=r"1 layer\(s\): 'out_head' \(768 -> 2\)"):
        replace_linear_with_lora(model, rank=16, alpha=16)
    assert count_parameters(model).trainable == 2_666_528


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("layout", ["save_pretrained", "openai-style"])
def test_loaded_weights_give_the_logits_of_transformers(hf_files, layout):
    hf, files = hf_files
    model = _tiny_model()
    load_gpt2_safetensors(model, files[layout])
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-4)
    assert model.out_head.weight is model.tok_emb.weight
    torch.testing.assert_close(
        model.trf_blocks[1].att.W_value.weight, hf.transformer.h[1].attn.c_attn.weight[:, 64:].T
    )


def test_loading_into_another_size_names_the_tensor_and_the_cause(hf_files):
    with pytest.raises(
        ValueError, match=r"wte.weight has shape \(50257, 32\).*needs \(50257, 64\)"
    ):
        load_gpt2_safetensors(_tiny_model({**TINY, "emb_dim": 64}), hf_files[1]["openai-style"])
    with pytest.raises(ValueError, match=r"missing \['h.2.ln_1.weight'.*2-block, 32-dim"):
        load_gpt2_safetensors(_tiny_model({**TINY, "n_layers": 3}), hf_files[1]["openai-style"])
    with torch.device("meta"):
        small = GPTModel(gpt2_config("gpt2-small"))
    with pytest.raises(ValueError, match=r"but the model is gpt2-small \(12 blocks, 768-dim\)"):
        load_gpt2_safetensors(small, hf_files[1]["save_pretrained"])


def test_loading_into_a_model_without_qkv_bias_names_the_extra_tensors(hf_files):
    model = _tiny_model({**TINY, "qkv_bias": False})
    with pytest.raises(ValueError, match=r"unexpected \['h.0.attn.c_attn.bias'.*qkv_bias"):
        load_gpt2_safetensors(model, hf_files[1]["openai-style"])


def test_a_file_that_is_not_gpt2_or_not_safetensors_is_a_clear_error(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"not a GPT-2 checkpoint: it has no wte\.weight"):
        load_gpt2_safetensors(_tiny_model(), tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_gpt2_safetensors(_tiny_model(), tmp_path / "junk.safetensors")


def test_a_missing_file_says_it_does_not_exist_and_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; download_gpt2_weights\(name\)"):
        load_gpt2_safetensors(_tiny_model(), tmp_path / "missing.safetensors")


def test_loading_after_lora_is_refused(hf_files):
    model = replace_linear_with_lora(_tiny_model(), 2, 2, ["W_query"])
    with pytest.raises(ValueError, match="load the pretrained weights first"):
        load_gpt2_safetensors(model, hf_files[1]["openai-style"])


# ------------------------------------------------------------------- pretrained or fallback


def test_fallback_is_announced_and_seeded_when_lora_pretrained_is_0(monkeypatch, capsys):
    monkeypatch.setenv("LORA_PRETRAINED", "0")
    model, source = load_gpt2_or_fallback("gpt2-small", seed=5)
    banner = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "RANDOMLY INITIALISED GPT-2, not the pretrained gpt2-small" in banner
    assert "Why: LORA_PRETRAINED=0 is set" in banner
    assert "gpt2/gpt2-small/model.safetensors" in banner
    assert (source.name, source.pretrained) == ("gpt2-fallback", False)
    assert model.cfg == FALLBACK_CONFIG
    assert not model.training
    again, _ = load_gpt2_or_fallback("gpt2-small", seed=5)
    other, _ = load_gpt2_or_fallback("gpt2-small", seed=6)
    assert torch.equal(model.tok_emb.weight, again.tok_emb.weight)
    assert not torch.equal(model.tok_emb.weight, other.tok_emb.weight)


def test_fallback_says_why_when_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("LORA_PRETRAINED")
    monkeypatch.delenv("LORA_ASSETS_PATH", raising=False)
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_OFFLINE", "1")
    _, source = load_gpt2_or_fallback("gpt2-medium")
    assert not source.pretrained
    assert "Why: Could not download gpt2/gpt2-medium/model.safetensors" in capsys.readouterr().out


def test_pretrained_weights_are_downloaded_verified_cached_and_loaded(
    hf_files, monkeypatch, tmp_path, capsys
):
    hf, files = hf_files
    data = files["save_pretrained"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(gpt2._SIZES, "gpt2-small", (TINY["emb_dim"], TINY["n_layers"], 4))
    monkeypatch.setitem(gpt2.WEIGHT_FILES, "gpt2-small", gpt2.WeightFile("test", sha, len(data)))
    monkeypatch.delenv("LORA_PRETRAINED")
    monkeypatch.delenv("LORA_ASSETS_PATH", raising=False)
    monkeypatch.delenv("LORA_OFFLINE", raising=False)  # the server is local
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path))
    with FileServer({"/model.safetensors": data}) as server:
        monkeypatch.setattr(gpt2, "weights_url", lambda name: server.url("/model.safetensors"))
        model, source = load_gpt2_or_fallback("gpt2-small")
    assert source.pretrained
    assert "FALLBACK" not in capsys.readouterr().out
    assert (tmp_path / "gpt2" / "gpt2-small" / "model.safetensors").read_bytes() == data
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    assert model.out_head.weight is model.tok_emb.weight
    assert not model.training

    monkeypatch.setenv("LORA_OFFLINE", "1")  # the cached copy needs no network
    _, source = load_gpt2_or_fallback("gpt2-small")
    assert source.pretrained


# ---------------------------------------------------------------------------- tokenizer


@needs_shared_tokenizer
def test_tokenizer_is_built_from_local_files_without_the_network(monkeypatch, tmp_path):
    def no_network(blobpath):
        raise AssertionError(f"tiktoken tried to read {blobpath}")

    monkeypatch.setenv("LORA_ASSETS_PATH", str(SHARED_TOKENIZER.parent))
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_OFFLINE", "1")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding loaded earlier
    tokenizer = get_tokenizer()
    assert tokenizer.n_vocab == 50257
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert (tmp_path / "tiktoken-cache" / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").is_file()
    assert (tmp_path / "tiktoken-cache" / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file()


def test_tokenizer_without_files_or_network_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_ASSETS_PATH", raising=False)
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_OFFLINE", "1")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    with pytest.raises(AssetError, match="LORA_ASSETS_PATH at a folder holding gpt2-tokenizer/"):
        get_tokenizer()


def test_text_round_trips_through_token_ids(gpt2_tokenizer):
    tokenizer = gpt2_tokenizer
    ids = text_to_token_ids("LoRA adapts GPT-2.<|endoftext|>", tokenizer)
    assert ids.shape == (1, ids.numel())
    assert ids[0, -1].item() == 50256
    assert token_ids_to_text(ids, tokenizer) == "LoRA adapts GPT-2.<|endoftext|>"
    with pytest.raises(ValueError, match="one row at a time"):
        token_ids_to_text(ids.repeat(2, 1), tokenizer)


# --------------------------------------------------------------------------- generation


def test_generate_extends_the_prompt_greedily_and_deterministically():
    model = _tiny_model(SMALL)
    prompt = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, 7)
    assert out.shape == (2, 12)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, generate(model, prompt, 7))
    with torch.no_grad():
        assert torch.equal(out[:, 5], model(prompt)[:, -1].argmax(-1))
    torch.manual_seed(0)
    assert torch.equal(generate(model, prompt, 7, temperature=1.5, top_k=1), out)


def test_top_k_sampling_draws_only_from_the_k_most_likely_tokens():
    model = _tiny_model(SMALL)
    prompt = torch.tensor([[1, 2, 3]]).repeat(300, 1)
    with torch.no_grad():
        top3 = set(model(prompt[:1])[0, -1].topk(3).indices.tolist())
    torch.manual_seed(0)
    drawn = set(generate(model, prompt, 1, temperature=1.0, top_k=3)[:, -1].tolist())
    assert drawn == top3
    torch.manual_seed(0)
    assert len(set(generate(model, prompt, 1, temperature=1.0)[:, -1].tolist())) > 3


def test_generation_stops_at_eos_and_crops_to_the_context():
    model = _tiny_model(SMALL)
    prompt = torch.tensor([[4, 5, 6]])
    first = generate(model, prompt, 1)[0, -1].item()
    assert generate(model, prompt, 5, eos_id=first).shape == (1, 4)
    long_prompt = torch.randint(0, 60, (1, 20))  # longer than context_length 16
    assert generate(model, long_prompt, 3).shape == (1, 23)


def test_generate_keeps_the_training_mode_and_rejects_bad_arguments():
    model = _tiny_model(SMALL).train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, torch.tensor([[1]]), 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        generate(model, torch.tensor([[1]]), 2, temperature=1, top_k=0)
    with pytest.raises(ValueError, match=r"shape \(batch, tokens\)"):
        generate(model, torch.tensor([1, 2]), 2)


def test_forward_rejects_unbatched_and_too_long_inputs():
    model = _tiny_model(SMALL)
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="17 tokens exceed the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------- classification


def test_classifier_head_reads_the_last_or_last_real_token():
    model = _tiny_model(SMALL)
    embedding = model.tok_emb.weight.detach().clone()
    to_classifier(model, 3)
    assert model.out_head.bias is not None
    assert torch.equal(model.tok_emb.weight, embedding)
    ids = torch.randint(0, 60, (2, 6))
    with torch.no_grad():
        full = model(ids)
        assert full.shape == (2, 6, 3)
        torch.testing.assert_close(classify_logits(model, ids), full[:, -1])
        picked = classify_logits(model, ids, lengths=torch.tensor([2, 6]))
    torch.testing.assert_close(picked, torch.stack([full[0, 1], full[1, 5]]))
    with pytest.raises(ValueError, match=r"values in 1\.\.6"):
        classify_logits(model, ids, lengths=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="n_classes must be a positive integer"):
        to_classifier(model, 0)


@pytest.mark.parametrize(
    "lengths",
    [np.array([1, 6, 4]), [1, 6, 4], np.array([1, 6, 4], dtype=np.int32), torch.tensor([1, 6, 4])],
)
def test_classify_logits_takes_lengths_as_any_integers(lengths):
    model = to_classifier(_tiny_model(SMALL), 2)
    ids = torch.randint(0, 60, (3, 6))
    with torch.no_grad():
        full = model(ids)
        picked = classify_logits(model, ids, lengths)
    torch.testing.assert_close(picked, torch.stack([full[0, 0], full[1, 5], full[2, 3]]))


class _NoForward(GPTModel):
    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        raise AssertionError("classify_logits ran the model before checking its arguments")


@pytest.mark.parametrize(
    ("idx", "lengths", "error", "message"),
    [
        (torch.zeros(2, 6), None, TypeError, r"dtype torch.float32; pass idx.long\(\)"),
        ([[1, 2, 3]], None, TypeError, r"got a list; pass torch.tensor\(ids\)"),
        (torch.zeros(6, dtype=torch.long), None, ValueError, r"shape \(batch, tokens\)"),
        (torch.zeros(2, 0, dtype=torch.long), None, ValueError, "at least one token"),
        (torch.tensor([[1, 60]]), None, ValueError, r"in \[0, 60\).*from 1 to 60; encode"),
        (torch.tensor([[-1, 2]]), None, ValueError, r"from -1 to 2"),
        (torch.ones(2, 6, dtype=torch.long), ["2", "6"], TypeError, r"got a list; pass torch"),
        (torch.ones(2, 6, dtype=torch.long), "26", TypeError, r"got a str; pass torch.tensor"),
        (torch.ones(2, 6, dtype=torch.long), [2.0, 6.0], TypeError, "got dtype torch.float32"),
        (torch.ones(2, 6, dtype=torch.long), torch.tensor([2.0, 6.0]), TypeError, "integers"),
        (torch.ones(2, 6, dtype=torch.long), torch.tensor([2]), ValueError, r"shape \(2,\)"),
        (torch.ones(2, 6, dtype=torch.long), torch.tensor([0, 6]), ValueError, r"1\.\.6, got \[0"),
        (torch.ones(2, 6, dtype=torch.long), torch.tensor([2, 7]), ValueError, r"1\.\.6, got \[2"),
        (torch.ones(2, 6, dtype=torch.long), np.array([7, 1]), ValueError, r"1\.\.6, got \[7"),
        (torch.ones(2, 6, dtype=torch.long), [2, 0], ValueError, r"1\.\.6, got \[2, 0"),
    ],
)
def test_classify_logits_checks_ids_and_lengths_before_the_forward_pass(
    idx, lengths, error, message
):
    torch.manual_seed(0)
    model = to_classifier(_NoForward(SMALL), 2)
    with pytest.raises(error, match=message):
        classify_logits(model, idx, lengths)


def test_set_dropout_reaches_every_dropout_and_refuses_a_bad_probability():
    model = gpt2.GPTModel({**gpt2.FALLBACK_CONFIG, "emb_dim": 16, "n_heads": 2, "n_layers": 2})
    replace_linear_with_lora(model.trf_blocks, 2, 2, ["W_query"], dropout=0.05)
    assert gpt2.set_dropout(model, 0.0) is model
    lora_dropouts = {id(b.att.W_query.lora.dropout) for b in model.trf_blocks}
    others = [
        m for m in model.modules() if isinstance(m, nn.Dropout) and id(m) not in lora_dropouts
    ]
    assert {m.p for m in others} == {0.0}
    assert {b.att.dropout for b in model.trf_blocks} == {0.0}
    assert model.cfg["drop_rate"] == 0.0  # what to_transformers reads
    # the adapter's own dropout is its setting, not the model's
    assert {b.att.W_query.lora.dropout.p for b in model.trf_blocks} == {0.05}
    for bad in (1.0, -0.1, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match=r"must be a number in \[0, 1\)"):
            gpt2.set_dropout(model, bad)
        assert {b.att.dropout for b in model.trf_blocks} == {0.0}
    assert gpt2.set_dropout(model, np.float32(0.25)).cfg["drop_rate"] == 0.25
    assert type(model.cfg["drop_rate"]) is float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_heads": 0}, r'cfg\["n_heads"\] must be a positive integer'),
        ({"n_layers": -1}, r'cfg\["n_layers"\] must be a positive integer'),
        ({"context_length": 0}, r'cfg\["context_length"\] must be a positive integer'),
        ({"emb_dim": 30}, r'cfg\["emb_dim"\] \(30\) must be divisible by cfg\["n_heads"\] \(4\)'),
        ({"drop_rate": 1.5}, r'cfg\["drop_rate"\] must be a number in \[0, 1\)'),
    ],
)
def test_model_config_values_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        GPTModel({**SMALL, **change})


def test_generate_refuses_an_empty_prompt_nan_temperature_and_negative_length():
    model = _tiny_model(SMALL)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, torch.tensor([[1]]), 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, torch.tensor([[1]]), -1)
    assert generate(model, torch.tensor([[1]]), 0).tolist() == [[1]]
    prompt = torch.tensor([[1, 2]])  # a temperature given as a tensor, as it used to work
    assert torch.equal(
        generate(model, prompt, 3, temperature=torch.tensor(0.0)), generate(model, prompt, 3)
    )


def test_token_ids_to_text_accepts_the_list_that_encode_returns(gpt2_tokenizer):
    assert token_ids_to_text(gpt2_tokenizer.encode("hi there"), gpt2_tokenizer) == "hi there"


def test_parameter_breakdown_refuses_a_model_that_is_not_a_gptmodel(hf_files):
    hf, _ = hf_files
    with pytest.raises(TypeError, match="needs this package's GPTModel, got a GPT2LMHeadModel"):
        parameter_breakdown(hf)


def test_to_classifier_refuses_an_out_head_with_lora():
    model = _tiny_model(SMALL)
    replace_linear_with_lora(model, 2, 4, ["out_head"])
    with pytest.raises(ValueError, match="call to_classifier before adding LoRA"):
        to_classifier(model, 2)
    assert model.out_head.lora is not None  # left as it was
