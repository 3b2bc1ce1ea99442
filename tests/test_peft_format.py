"""PEFT's format both ways, with transformers and PEFT as the oracles (tiny GPT-2s, float32).

Each test builds transformers' GPT-2 and our GPTModel with the same weights (through
load_gpt2_safetensors, the mapping the notebooks use) and compares logits to 1e-4.
"""

import copy
import itertools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_gpt import TINY
from torch import nn

from lora_helpers import peft_format
from lora_helpers.adapters import export_peft_adapter, load_peft_adapter
from lora_helpers.dora import replace_linear_with_dora
from lora_helpers.gpt2 import (
    GPTModel,
    classify_logits,
    gpt2_state_dict,
    load_gpt2_safetensors,
    to_classifier,
)
from lora_helpers.lora import (
    LinearWithLoRA,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_linear_with_lora,
)
from lora_helpers.peft_format import to_transformers, transformers_config
from lora_helpers.quant import add_lora_to_quantized, quantize_linears

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # notes from PEFT and transformers on what some tests build on purpose (fan_in_fan_out set
    # for them, the tiny vocabulary's special tokens, LoRA on lm_head, a LoRA bias) or use
    pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model config:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 100
PAD = VOCAB - 1  # stands for <|endoftext|> (data.PAD_ID), GPT-2's last token
CFG = {**TINY, "vocab_size": VOCAB}
TOL = 1e-4
OURS = ("W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2")
THEIRS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


def _hf_config(cfg: dict, **extra) -> "transformers.GPT2Config":
    return transformers_config(cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)


def _pair(cfg: dict, path) -> tuple[nn.Module, GPTModel]:
    """transformers' GPT2LMHeadModel and our GPTModel with the same (random) weights, in eval mode."""
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(_hf_config(cfg)).eval()
    state = {k: v.clone() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path))
    ours = GPTModel(cfg).eval()
    load_gpt2_safetensors(ours, path)
    return theirs, ours


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return _pair(CFG, tmp_path_factory.mktemp("base") / "model.safetensors")


@pytest.fixture
def ids():
    return torch.randint(0, PAD, (3, 10), generator=torch.Generator().manual_seed(1))


def _randomise_B(model: nn.Module, seed: int = 2) -> nn.Module:
    """B != 0 in every LoRA layer, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.B.copy_(0.5 * torch.randn(layer.lora.B.shape, generator=g))
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _in_peft(theirs: nn.Module, directory) -> nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(theirs), directory).eval()


def _peft_adapter(theirs, directory, *, steps: int = 0, **options) -> nn.Module:
    """A PEFT LoRA adapter of transformers' GPT-2, saved to `directory`: random A and B, or
    PEFT's own start (B = 0) trained `steps` AdamW steps on random tokens (B != 0)."""
    options.setdefault("init_lora_weights", steps > 0)
    config = peft.LoraConfig(fan_in_fan_out=True, **options)
    model = peft.get_peft_model(copy.deepcopy(theirs), config)
    if steps:
        torch.manual_seed(3)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        model.train()
        for _ in range(steps):
            ids = torch.randint(0, PAD, (4, 12))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(directory)
    return model


def _snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        model.out_head.weight is model.tok_emb.weight,
    )


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    state, modules, flags, tied = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert (model.out_head.weight is model.tok_emb.weight) == tied


# ------------------------------------------------------------------- ours -> PEFT


SUBSETS = [s for n in range(1, 7) for s in itertools.combinations(OURS, n)]


@pytest.mark.parametrize(
    ("index", "targets"), list(enumerate(SUBSETS)), ids=["+".join(s) for s in SUBSETS]
)
def test_every_target_subset_exports_to_the_same_logits_in_peft(
    bases, ids, tmp_path, index, targets
):
    theirs, base = bases
    rank, rslora = 2 + index % 3, index % 2 == 1  # ranks 2-4; alpha/r and rsLoRA alternate
    ours = replace_linear_with_lora(copy.deepcopy(base), rank, 3.0 * rank, targets, rslora=rslora)
    _randomise_B(ours)
    export_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora
    assert config["fan_in_fan_out"] is True
    expected = _logits(ours, ids)
    assert (expected - _logits(base, ids)).abs().max() > 1e-3  # the adapter does something
    assert (_logits(_in_peft(theirs, tmp_path), ids) - expected).abs().max() < TOL


def _mixed(base: GPTModel) -> GPTModel:
    """Each layer its own rank, alpha and rule; Q, K and V of block 0 all different."""
    settings = {
        "trf_blocks.0.att.W_query": (2, 4.0, False),
        "trf_blocks.0.att.W_key": (3, 3.0, True),
        "trf_blocks.0.att.W_value": (4, 16.0, False),
        "trf_blocks.0.ff.layers.0": (1, 1.0, False),
        "trf_blocks.1.att.W_query": (4, 8.0, True),
        "trf_blocks.1.att.W_value": (4, 8.0, True),
        "trf_blocks.1.att.out_proj": (2, 8.0, False),
        "trf_blocks.1.ff.layers.2": (8, 2.0, True),
    }
    model = copy.deepcopy(base)
    torch.manual_seed(4)
    for name, (rank, alpha, rslora) in settings.items():
        layer = LinearWithLoRA(model.get_submodule(name), rank, alpha, rslora=rslora)
        model.set_submodule(name, layer)
    return _randomise_B(model)


def test_per_module_ranks_alphas_and_rules_export_exactly(bases, ids, tmp_path):
    theirs, base = bases
    ours = _mixed(base)
    export_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is False  # mixed rules: each scaling is written as alpha / r
    assert config["rank_pattern"]["h.0.attn.c_attn"] == 2 + 3 + 4  # block-diagonal
    assert config["r"] == 8  # the most common rank: h.1's block-diagonal c_attn, its mlp.c_proj
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    B = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert B.shape == (3 * 32, 8)
    assert not B[32:64].any()
    assert (_logits(_in_peft(theirs, tmp_path), ids) - _logits(ours, ids)).abs().max() < TOL


def test_rank_patterns_name_each_block_exactly(tmp_path):
    """Twelve blocks: PEFT matches pattern keys as regular expressions, h.1 must not be h.11."""
    cfg = CFG | {"n_layers": 12}
    theirs, base = _pair(cfg, tmp_path / "model.safetensors")
    ours = copy.deepcopy(base)
    torch.manual_seed(8)
    for i, block in enumerate(ours.trf_blocks):
        block.att.W_query = LinearWithLoRA(block.att.W_query, 1 + i % 4, 2.0 + i)
    _randomise_B(ours)
    export_peft_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, PAD, (2, 8), generator=torch.Generator().manual_seed(9))
    in_peft = _in_peft(theirs, tmp_path / "adapter")
    assert (_logits(in_peft, ids) - _logits(ours, ids)).abs().max() < TOL
    back = load_peft_adapter(copy.deepcopy(base), tmp_path / "adapter")
    for (name, layer), (_, again) in zip(lora_layers(ours), lora_layers(back), strict=True):
        assert (again.lora.rank, again.lora.alpha) == (layer.lora.rank, layer.lora.alpha), name


def test_q_and_v_in_every_block_give_a_short_config(bases, tmp_path):
    ours = replace_linear_with_lora(copy.deepcopy(bases[1]), 4, 8, ["W_query", "W_value"])
    export_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_attn"]
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # rank 4 + 4, same scaling 2
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["task_type"] == "CAUSAL_LM"
    assert config["modules_to_save"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


# ------------------------------------------------------------------- PEFT -> ours


PEFT_SUBSETS = [list(s) for n in range(1, 5) for s in itertools.combinations(THEIRS, n)]


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
@pytest.mark.parametrize("targets", PEFT_SUBSETS, ids=["+".join(s) for s in PEFT_SUBSETS])
def test_every_peft_target_subset_loads_to_the_same_logits(bases, ids, tmp_path, targets, rslora):
    theirs, base = bases
    adapter = _peft_adapter(
        theirs, tmp_path, r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora
    )
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert (_logits(ours, ids) - _logits(adapter, ids)).abs().max() < TOL
    if "c_attn" in targets:  # Q, K and V each get the shared A, of the same rank
        att = ours.trf_blocks[0].att
        assert [m.lora.rank for m in (att.W_query, att.W_key, att.W_value)] == [4, 4, 4]
        assert torch.equal(att.W_query.lora.A, att.W_value.lora.A)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if ".lora." in n}


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": list(THEIRS), "r": 4, "lora_alpha": 8},
        {
            "target_modules": ["c_attn", "c_fc"],
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "rank_pattern": {"h.1.attn.c_attn": 2},
            "alpha_pattern": {"h.0.mlp.c_fc": 3},
        },
        {"target_modules": ["c_attn"], "r": 2, "lora_alpha": 16, "layers_to_transform": [1]},
    ],
    ids=["all", "patterns-rslora", "block-1"],
)
def test_a_trained_peft_adapter_loads_to_the_same_logits(bases, ids, tmp_path, options):
    theirs, base = bases
    adapter = _peft_adapter(theirs, tmp_path, steps=3, **options)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(t.any() for k, t in tensors.items() if "lora_B" in k)  # training moved B
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert (_logits(ours, ids) - _logits(adapter, ids)).abs().max() < TOL
    for name, layer in lora_layers(ours):
        assert layer.lora.rslora is options.get("use_rslora", False), name


def test_a_fresh_peft_adapter_keeps_every_projection(bases, tmp_path):
    _peft_adapter(
        bases[0], tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=True
    )
    ours = load_peft_adapter(copy.deepcopy(bases[1]), tmp_path)
    assert len(dict(lora_layers(ours))) == 6  # B = 0 everywhere: Q, K and V all keep theirs


# ------------------------------------------------------------------- round trips


def test_ours_to_peft_and_back_gives_the_same_layers_and_updates(bases, ids, tmp_path):
    ours = _mixed(bases[1])
    export_peft_adapter(ours, tmp_path)
    back = load_peft_adapter(copy.deepcopy(bases[1]), tmp_path)
    before, after = dict(lora_layers(ours)), dict(lora_layers(back))
    assert after.keys() == before.keys()
    for name, layer in before.items():
        assert after[name].lora.rank == layer.lora.rank, name
        torch.testing.assert_close(after[name].lora.delta_weight(), layer.lora.delta_weight())
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() < TOL


def test_peft_to_ours_and_back_gives_the_same_file(bases, tmp_path):
    options = {"r": 4, "lora_alpha": 8, "target_modules": list(THEIRS)}
    options |= {"rank_pattern": {"h.1.attn.c_attn": 2}, "alpha_pattern": {"h.0.mlp.c_fc": 3}}
    _peft_adapter(bases[0], tmp_path / "peft", steps=2, **options)
    ours = load_peft_adapter(copy.deepcopy(bases[1]), tmp_path / "peft")
    export_peft_adapter(ours, tmp_path / "ours")
    first = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    configs = [
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")
    ]
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert configs[1][key] == configs[0][key], key


# ------------------------------------------------------------------ the classifier


def _padded(lengths: list[int], width: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded with PAD to `width`, as data.encode pads messages."""
    g = torch.Generator().manual_seed(5)
    ids = torch.full((len(lengths), width), PAD)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(0, PAD, (n,), generator=g)
    return ids, torch.tensor(lengths)


def _classifier(base: GPTModel) -> GPTModel:
    """Notebook 05's LoRA mode: LoRA on the blocks and a 2-class head, trained a few steps."""
    torch.manual_seed(6)
    model = to_classifier(copy.deepcopy(base), 2)
    replace_linear_with_lora(model.trf_blocks, 4, 8)
    mark_only_lora_as_trainable(model)
    model.out_head.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, _ = _padded([10, 7, 4, 2, 9, 5])
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    model.train()
    for _ in range(5):
        nn.functional.cross_entropy(classify_logits(model, ids), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.out_head.bias.abs().max() > 0.01
    return model.eval()


def _hf_classifier(theirs: nn.Module) -> nn.Module:
    config = _hf_config(CFG, num_labels=2, pad_token_id=None)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    model.transformer.load_state_dict(theirs.transformer.state_dict())
    return model


def test_the_notebook_05_classifier_gives_the_same_predictions_in_transformers(bases, tmp_path):
    theirs, base = bases
    ours = _classifier(base)
    export_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["score", "ln_f"]  # ln_f carries the head's bias
    hf = _in_peft(_hf_classifier(theirs), tmp_path)
    ids, lengths = _padded([10, 6, 3, 1])
    # Notebook 05 reads the last position, padding included: pad_token_id None, one row at a time.
    with torch.no_grad():
        expected = classify_logits(ours, ids)
        rows = torch.cat([hf(input_ids=row[None]).logits for row in ids])
    assert (rows - expected).abs().max() < TOL
    assert torch.equal(rows.argmax(-1), expected.argmax(-1))
    # With lengths, the last real token: transformers' pad_token_id, in one batch.
    hf.base_model.model.config.pad_token_id = PAD
    with torch.no_grad():
        expected = classify_logits(ours, ids, lengths)
        batch = hf(input_ids=ids).logits
        unpadded = classify_logits(ours, ids)
    assert (batch - expected).abs().max() < TOL
    with torch.no_grad():  # right padding, causal attention: a mask changes nothing there
        masked = hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    assert (masked - expected).abs().max() < TOL
    # The two conventions read different tokens where a row is padded.
    assert (batch[1:] - unpadded[1:]).abs().amax(-1).min() > 1e-3


def test_a_peft_classifier_loads_with_its_head(bases, tmp_path):
    theirs, base = bases
    hf = _hf_classifier(theirs)
    hf.config.pad_token_id = PAD
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )
    adapter = peft.get_peft_model(hf, config)
    torch.manual_seed(7)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    ids, lengths = _padded([10, 7, 4, 2])
    for _ in range(3):
        adapter(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter.eval().save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert ours.out_head.out_features == 2
    assert not ours.out_head.bias.any()
    with torch.no_grad():
        diff = classify_logits(ours, ids, lengths) - adapter(input_ids=ids).logits
    assert diff.abs().max() < TOL


def test_the_classifier_comes_back_with_its_bias(bases, ids, tmp_path):
    ours = _classifier(bases[1])
    export_peft_adapter(ours, tmp_path)
    back = load_peft_adapter(copy.deepcopy(bases[1]), tmp_path)
    torch.testing.assert_close(back.out_head.bias, ours.out_head.bias)
    assert torch.equal(back.out_head.weight, ours.out_head.weight)
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() < TOL


def test_a_head_bias_that_cannot_move_is_refused(bases, tmp_path):
    ours = _classifier(bases[1])
    with torch.no_grad():  # two equal rows with different biases: W delta = b has no solution
        ours.out_head.weight[1] = ours.out_head.weight[0]
    with pytest.raises(ValueError, match="cannot be carried exactly"):
        export_peft_adapter(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ refused exports


def _lora(base: GPTModel) -> GPTModel:
    return replace_linear_with_lora(copy.deepcopy(base), 4, 8, ["W_query"])


def _untied(base: GPTModel) -> GPTModel:
    model = _lora(base)
    model.out_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    return model


def _quantised(base: GPTModel) -> GPTModel:
    model = copy.deepcopy(base)
    add_lora_to_quantized(quantize_linears(model.trf_blocks, block_size=16), 4, 8)
    return model


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda base: nn.Sequential(_lora(base)), TypeError, "GPTModel"),
        (copy.deepcopy, ValueError, "no LoRA layers"),
        (lambda base: merge_lora(_lora(base)), ValueError, "unmerge_lora"),
        (
            lambda base: replace_linear_with_dora(copy.deepcopy(base), 4, 8, ["W_query"]),
            ValueError,
            "DoRA",
        ),
        (_quantised, ValueError, "quantised"),
        (
            lambda base: replace_linear_with_lora(copy.deepcopy(base), 4, 8, ["out_head", "W_key"]),
            ValueError,
            "outside the transformer blocks",
        ),
        (_untied, ValueError, "not tied"),
    ],
    ids=["not-gptmodel", "no-lora", "merged", "dora", "quantised", "lora-on-head", "untied-head"],
)
def test_an_export_that_cannot_be_exact_is_refused_and_writes_nothing(
    bases, tmp_path, make, error, message
):
    model = make(bases[1])
    with pytest.raises(error, match=message):
        export_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- refused loads


def _write_adapter(directory, tensors: dict, **config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": True} | config
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _llama(bases, directory) -> None:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.zeros(4, 32),
        f"{prefix}.lora_B.weight": torch.zeros(32, 4),
    }
    _write_adapter(directory, tensors)


def _another_size(directory, **cfg) -> None:
    other, _ = _pair(CFG | cfg, directory.parent / "other.safetensors")
    _peft_adapter(other, directory, r=4, lora_alpha=8, target_modules=["c_attn"])


def _ia3(bases, directory) -> None:
    config = peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True,
    )
    peft.get_peft_model(copy.deepcopy(bases[0]), config).save_pretrained(directory)


def _trained_ln_f(bases, directory) -> None:
    model = _classifier(bases[1])
    with torch.no_grad():
        model.final_norm.weight.mul_(1.5)
    export_peft_adapter(model, directory)


def _plain(directory, theirs, **options) -> None:
    _peft_adapter(
        theirs, directory, **({"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]} | options)
    )


def _edited(directory, theirs, **changes) -> None:
    _plain(directory, theirs)
    _edit_config(directory, **changes)


def _nan_alpha(bases, directory) -> None:
    """A classifier whose last module has alpha NaN: refused after the head is replaced and the
    first layers are wrapped, so this undoes real changes."""
    export_peft_adapter(_classifier(bases[1]), directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    _edit_config(
        directory, alpha_pattern=config["alpha_pattern"] | {"h.1.mlp.c_proj": float("nan")}
    )


def _damaged(directory, theirs, text: str) -> None:
    _plain(directory, theirs)
    (directory / "adapter_config.json").write_text(text)


def _broken_weights(directory, theirs) -> None:
    _plain(directory, theirs)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:40])


def _nan_weights(directory, theirs) -> None:
    _plain(directory, theirs)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))


REFUSALS = {
    "another-architecture": (_llama, "another architecture"),
    "wider": (lambda b, d: _another_size(d, emb_dim=48, n_heads=4), "another GPT-2 size"),
    "deeper": (lambda b, d: _another_size(d, n_layers=3), "another GPT-2 size"),
    "dora": (lambda b, d: _plain(d, b[0], use_dora=True), "use_dora=True"),
    "ia3": (_ia3, "not LoRA"),
    "lm-head": (
        lambda b, d: _plain(d, b[0], target_modules=["c_attn", "lm_head"]),
        "other targets",
    ),
    "wpe-saved": (lambda b, d: _plain(d, b[0], modules_to_save=["wpe"]), "modules_to_save"),
    "bias-all": (lambda b, d: _plain(d, b[0], bias="all"), "bias='all'"),
    "lora-bias": (lambda b, d: _plain(d, b[0], lora_bias=True), "lora_bias=True"),
    "pissa": (lambda b, d: _edited(d, b[0], init_lora_weights="pissa"), "changes the base weights"),
    "rank-edited": (lambda b, d: _edited(d, b[0], r=8), "rank 8"),
    "trained-ln_f": (_trained_ln_f, "final LayerNorm"),
    "nan-alpha": (_nan_alpha, r"alpha_pattern\['h.1.mlp.c_proj'\] in .* is nan"),
    # damaged files: one sentence naming the file or the setting, nothing changed
    "not-json": (lambda b, d: _damaged(d, b[0], "{'r': 4"), "not valid JSON"),
    "json-list": (lambda b, d: _damaged(d, b[0], "[1, 2]"), "holds a list"),
    "no-peft-type": (lambda b, d: _damaged(d, b[0], "{}"), "without a peft_type"),
    "rank-as-text": (lambda b, d: _edited(d, b[0], r="4"), r"r in .* is '4'"),
    "alpha-null": (lambda b, d: _edited(d, b[0], lora_alpha=None), "lora_alpha in .* is None"),
    "bad-pattern": (lambda b, d: _edited(d, b[0], rank_pattern={"h.(0": 4}), "not a valid pattern"),
    "dropout-1": (lambda b, d: _edited(d, b[0], lora_dropout=1.0), r"lora_dropout .* \[0, 1\)"),
    "not-safetensors": (lambda b, d: _broken_weights(d, b[0]), "cannot be read as safetensors"),
    "nan-weights": (lambda b, d: _nan_weights(d, b[0]), "NaN or infinite"),
}


@pytest.mark.parametrize(("build", "message"), REFUSALS.values(), ids=list(REFUSALS))
def test_a_peft_adapter_that_does_not_map_is_refused_and_changes_nothing(
    bases, tmp_path, build, message
):
    build(bases, tmp_path / "adapter")
    model = copy.deepcopy(bases[1])
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(model, tmp_path / "adapter")
    _assert_unchanged(model, snapshot)


def test_loading_into_a_model_with_lora_or_not_a_gptmodel_is_refused(bases, tmp_path):
    theirs, base = bases
    _peft_adapter(theirs, tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"])
    model = _lora(base)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="fresh base model"):
        load_peft_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)
    with pytest.raises(TypeError, match="GPTModel"):
        load_peft_adapter(nn.Sequential(copy.deepcopy(base)), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "nowhere")


def test_a_classifier_head_without_bias_needs_no_ln_f(bases, ids, tmp_path):
    ours = _classifier(bases[1])
    with torch.no_grad():
        ours.out_head.bias.zero_()
    export_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    hf = _in_peft(_hf_classifier(bases[0]), tmp_path)
    with torch.no_grad():
        diff = torch.cat([hf(input_ids=row[None]).logits for row in ids]) - ours(ids)[:, -1]
    assert diff.abs().max() < TOL


def test_layers_of_different_dropouts_export_the_largest_with_a_warning(bases, tmp_path):
    model = replace_linear_with_lora(copy.deepcopy(bases[1]), 4, 8, ["W_query"], dropout=0.1)
    replace_linear_with_lora(model, 4, 8, ["W_value"], dropout=0.2)
    with pytest.warns(UserWarning, match="lora_dropout is one number"):
        export_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.2


def test_importing_the_package_loads_neither_peft_nor_transformers():
    code = "import sys, lora_helpers.adapters; print(sorted({'peft', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------- our base in transformers


def test_gpt2_state_dict_reverses_load_gpt2_safetensors(bases, tmp_path):
    theirs, ours = bases
    state = gpt2_state_dict(ours)
    expected = {k: v for k, v in theirs.transformer.state_dict().items() if k in state}
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    save_file(state, str(tmp_path / "again.safetensors"))
    again = GPTModel(CFG).eval()
    load_gpt2_safetensors(again, tmp_path / "again.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(again.parameters(), ours.parameters(), strict=True)
    )


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_to_transformers_computes_our_logits(ids, qkv_bias):
    torch.manual_seed(3)
    ours = GPTModel({**CFG, "qkv_bias": qkv_bias}).eval()
    with torch.no_grad():
        assert (to_transformers(ours)(ids).logits - ours(ids)).abs().max() < TOL
        classifier = to_classifier(copy.deepcopy(ours), 3).eval()
        theirs = to_transformers(classifier, n_classes=3)
        theirs.score.weight.copy_(classifier.out_head.weight)
        expected = classify_logits(classifier, ids) - classifier.out_head.bias
        assert (theirs(input_ids=ids[:1]).logits - expected[:1]).abs().max() < TOL


def test_to_transformers_refuses_what_gpt2_has_no_place_for(bases):
    _, base = bases
    with pytest.raises(TypeError, match="GPTModel"):
        to_transformers(nn.Linear(2, 2))
    for changed in (_lora(base), replace_linear_with_dora(copy.deepcopy(base), 2, 4)):
        with pytest.raises(ValueError, match="merge_lora"):
            to_transformers(changed)
    with pytest.raises(ValueError, match="Quantized"):
        to_transformers(quantize_linears(copy.deepcopy(base)))


@pytest.mark.parametrize("n_classes", [0, -1, 2.0])
def test_to_transformers_refuses_an_n_classes_that_is_not_none_or_positive(bases, n_classes):
    _, base = bases
    with pytest.raises(ValueError, match=r"n_classes must be a positive integer.*or None"):
        to_transformers(base, n_classes)


def test_a_failure_late_in_a_load_puts_back_the_head_and_every_layer(bases, tmp_path, monkeypatch):
    """The head is replaced and blocks are wrapped before the last wrap fails: all undone."""
    export_peft_adapter(_classifier(bases[1]), tmp_path)
    model = copy.deepcopy(bases[1])
    snapshot = _snapshot(model)
    wrapped = []

    def wraps_then_fails(model, *args, **kwargs):
        replace_linear_with_lora(model, *args, **kwargs)
        wrapped.extend(n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))
        raise ValueError("a wrap refused late")

    monkeypatch.setattr(peft_format, "replace_linear_with_lora", wraps_then_fails)
    with pytest.raises(ValueError, match="refused late"):
        load_peft_adapter(model, tmp_path)
    assert wrapped  # the load had really changed the model
    _assert_unchanged(model, snapshot)
    assert model.out_head.weight is model.tok_emb.weight


def test_meta_models_are_refused_by_name(bases, tmp_path):
    theirs = bases[0]
    _plain(tmp_path / "adapter", theirs)
    with torch.device("meta"):
        meta = GPTModel(CFG)
    for call in (
        lambda: load_peft_adapter(meta, tmp_path / "adapter"),
        lambda: to_transformers(meta),
        lambda: export_peft_adapter(replace_linear_with_lora(meta, 2, 4), tmp_path / "out"),
    ):
        with pytest.raises(ValueError, match="meta device"):
            call()
    assert not (tmp_path / "out").exists()


def test_export_into_a_file_path_is_refused(bases, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_peft_adapter(_lora(bases[1]), tmp_path / "taken")


def test_to_transformers_keeps_the_models_dtype(bases):
    half = copy.deepcopy(bases[1]).to(torch.bfloat16)
    assert to_transformers(half).transformer.wte.weight.dtype == torch.bfloat16
