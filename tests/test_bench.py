"""lora_helpers.bench: the command at a tiny size, the FLOP and memory accounting against hand
counts, the GPU script's commands, and LoRA's forward kept bit-identical by its speed-up."""

import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from lora_helpers import bench
from lora_helpers.gpt2 import GPTModel, gpt2_config
from lora_helpers.lora import LinearWithLoRA, LoRALayer, lora_layers, replace_linear_with_lora

ROOT = Path(__file__).resolve().parents[1]
HAS_PEFT = importlib.util.find_spec("peft") is not None

# ---------------------------------------------------------------- the command, tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m lora_helpers.bench` at the tiny size, as CI runs it: (JSON, output folder,
    stdout, stderr)."""
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "lora_helpers.bench", "--size", "tiny", "--batch", "2"]
    command += ["--tokens", "16", "--steps", "2", "--device", "cpu", "--no-progress"]
    done = subprocess.run(
        [*command, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "bench-cpu-tiny.json").read_text()), out, done.stdout, done.stderr


def test_the_json_has_the_issues_shape(tiny_run):
    result, _, _, _ = tiny_run
    assert {"device", "size", "batch", "tokens", "modes", "inference"} <= set(result)
    assert (result["device"], result["size"], result["batch"], result["tokens"]) == (
        "cpu",
        "tiny",
        2,
        16,
    )
    expected = [m for m in bench.MODES if HAS_PEFT or m != "peft-lora"]
    assert list(result["modes"]) == expected
    for mode, numbers in result["modes"].items():
        for key in ("step_seconds", "tokens_per_second"):
            assert numbers[key] > 0, (mode, key)
        for key in ("trainable_params", "peak_memory_bytes", "checkpoint_bytes"):
            assert isinstance(numbers[key], int), (mode, key)
            assert numbers[key] > 0, (mode, key)
        assert numbers["tokens_per_second"] == pytest.approx(2 * 16 / numbers["step_seconds"])
        assert numbers["peak_memory_method"] == bench.COMPUTED  # on a CPU
    assert set(result["inference"]) == {"base", "lora-unmerged", "lora-merged"}
    assert all(seconds > 0 for seconds in result["inference"].values())
    for name, times in result["inference_seconds_each"].items():
        assert len(times) == result["steps"], name
        assert result["inference"][name] == statistics.median(times)


def test_the_ratios_are_finite(tiny_run):
    result, _, _, _ = tiny_run
    ratios = bench.ratios(result)
    if not HAS_PEFT:
        ratios.pop("lora / peft-lora step time")
    assert all(math.isfinite(r.median) and 0 < r.low <= r.median <= r.high for r in ratios.values())


def test_ratios_are_taken_round_by_round():
    """Each round's pair met the same load, so the ratio is the median of per-round ratios:
    here 0.5, where the ratio of the medians (2 / 2) and sorted pairs would give 1."""
    result = {
        "modes": {
            "lora": {"step_seconds_each": [1.0, 4.0, 2.0]},
            "full": {"step_seconds_each": [2.0, 8.0, 1.0]},
        },
        "inference_seconds_each": {"base": [1.0, 1.0], "lora-merged": [0.9, 1.2]},
    }
    ratios = bench.ratios(result)
    assert ratios["lora / full step time"].median == 0.5
    assert math.isnan(ratios["lora / peft-lora step time"].median)
    assert ratios["merged / base inference"].median == pytest.approx(1.05)
    result["modes"]["full"]["step_seconds_each"] = [2.0, 8.0]
    with pytest.raises(ValueError, match="one positive time per round"):
        bench.ratio(result, "lora", "full")


def test_middle_half_and_verdict():
    assert bench.middle_half([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0, 4.0, 5)
    assert bench.middle_half([2.5]) == (2.5, 2.5, 2.5, 1)
    assert math.isnan(bench.middle_half([]).median)
    with pytest.raises(ValueError, match="NaN"):
        bench.middle_half([1.0, math.nan, 2.0])
    below, above = "below 1: the whole middle half", "above 1: the whole middle half"
    assert bench.verdict(bench.Middle(0.65, 0.6, 0.72, 20)).startswith(below)
    assert bench.verdict(bench.Middle(1.1, 1.05, 1.2, 20)).startswith(above)
    for straddles in (bench.Middle(0.98, 0.88, 1.1, 20), bench.Middle(1.02, 0.95, 1.1, 20)):
        assert "within the round-to-round spread" in bench.verdict(straddles)
    assert bench.verdict(bench.Middle(0.5, 0.5, 0.5, 2)) == "too few rounds (2) to judge"
    assert bench.verdict(bench.middle_half([])) == "not measured"
    assert bench.Middle(3.0558, 2.84, 3.398, 20).format(",.0f", 1000) == "3,056 (2,840-3,398)"
    assert bench.Middle(1.3, 1.3, 1.3, 1).format() == "1.30"


def test_the_summary_shows_each_timings_middle_half_and_each_ratios_verdict(tiny_run):
    result = tiny_run[0]
    text = bench.summary(result)
    for mode, numbers in result["modes"].items():
        step = bench.middle_half(numbers["step_seconds_each"]).format(",.0f", 1000)
        assert f"{step} ms" in text, mode
    for name, middle in bench.ratios(result).items():
        if not math.isnan(middle.median):
            assert f"  {name}: {middle.format()}, {bench.verdict(middle)}" in text


def test_a_result_written_before_inference_passes_were_kept_still_reads():
    """A JSON from before this field existed (e.g. a GPU run committed earlier): the medians
    serve as one pass each, and no verdict is claimed from one pass."""
    result = json.loads((ROOT / "results" / "bench-cpu-gpt2-small.json").read_text())
    del result["inference_seconds_each"]
    merged = bench.ratios(result)["merged / base inference"]
    assert merged.n == 1
    assert merged.median == result["inference"]["lora-merged"] / result["inference"]["base"]
    assert "merged / base inference: " in bench.summary(result)
    assert "too few rounds (1) to judge" in bench.summary(result)
    plt.close(bench.plot_bench(result))


def test_trainable_parameters_and_checkpoints_match_hand_counts(tiny_run):
    modes = tiny_run[0]["modes"]
    d, layers, vocab, context, r = 64, 2, 512, 64, 16
    # per block: Q, K, V, out (d -> d), MLP (d -> 4d -> d); LoRA adds r * (in + out) to each
    assert modes["lora"]["trainable_params"] == layers * r * (4 * 2 * d + 2 * 5 * d)
    block = 12 * d * d + 9 * d + 4 * d  # weights, biases (3d + d + 4d + d), two LayerNorms
    assert modes["full"]["trainable_params"] == vocab * d + context * d + layers * block + 2 * d
    assert modes["last-block"]["trainable_params"] == block + 2 * d
    if HAS_PEFT:  # c_attn (d -> 3d) has one A for Q, K and V
        per_block = r * (4 * d + 2 * d + 5 * d + 5 * d)
        assert modes["peft-lora"]["trainable_params"] == layers * per_block
    assert modes["lora"]["checkpoint_bytes"] < modes["last-block"]["checkpoint_bytes"]
    assert modes["last-block"]["checkpoint_bytes"] < modes["full"]["checkpoint_bytes"]


def test_it_writes_a_png_and_no_partial_files_and_prints_the_accounting(tiny_run):
    _, out, stdout, _ = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["bench-cpu-tiny.json", "bench-cpu-tiny.png"]
    assert (out / "bench-cpu-tiny.png").read_bytes().startswith(b"\x89PNG")
    assert "FLOPs per token: full 6N" in stdout
    assert "lora / full step time" in stdout


def test_a_plot_that_fails_writes_neither_file(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "plot_bench", lambda result: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bench.write_results(tiny_run[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # neither file, nor even the folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "tiny", "--tokens", "999"], "context length 64"),
        (["--size", "tiny", "--steps", "0"], "steps must be a positive integer, got 0"),
        (["--size", "gpt2-huge"], "invalid choice"),
        (["--size", "tiny", "--rank", "0"], "rank must be a positive integer, got 0"),
        (["--size", "tiny", "--rank", "-3"], "rank must be a positive integer, got -3"),
        (["--size", "tiny", "--alpha", "0"], "alpha is 0"),
        (["--size", "tiny", "--alpha", "nan"], "alpha must be a finite number, got nan"),
    ],
)
def test_bad_arguments_stop_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_out_that_is_a_file_stops_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: pytest.fail("ran"))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--size", "tiny", "--out", str(tmp_path / "file")])
    assert stop.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_the_help_shows_the_defaults():
    text = bench.build_parser().format_help()
    for default in ("gpt2-small", "(default: 8)", "(default: 64)", "(default: 5)", "(default: 16)"):
        assert default in text


def test_no_runtime_warning_from_running_the_module_in_worker_processes(tiny_run):
    assert "found in sys.modules" not in tiny_run[3], tiny_run[3]


def test_the_summary_prints_only_the_ratios_whose_modes_ran(tiny_run):
    result = tiny_run[0]
    text = bench.summary({**result, "modes": {"lora": result["modes"]["lora"]}})
    assert "step time" not in text
    assert "nan" not in text
    assert "merged / base inference" in text
    assert "lora / full step time" in bench.summary(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_missing_device_says_so():
    with pytest.raises(ValueError, match="No CUDA device here"):
        bench.run("tiny", device="cuda", progress=False)
    with pytest.raises(SystemExit):  # the command line: a usage error, before any work
        bench.main(["--size", "tiny", "--device", "cuda"])


def test_peft_alone_without_peft_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "peft" else real(name)
    )
    with pytest.raises(ValueError, match="pip install peft"):
        bench.run("tiny", modes=["peft-lora"], device="cpu")


def test_the_gpu_script_runs_the_bench_with_valid_arguments():
    """results/gpu_bench.sh cannot run here; its commands are the ones tested above, at other
    sizes: each must parse and pass the checks the command makes before any work."""
    script = (ROOT / "results" / "gpu_bench.sh").read_text()
    lines = [line for line in script.splitlines() if "-m lora_helpers.bench" in line]
    sizes = set()
    for line in lines:
        argv = shlex.split(line.split("-m lora_helpers.bench", 1)[1].replace("\\", ""))
        args = bench.build_parser().parse_args([a for a in argv if "$" not in a])
        bench._check(args.size, args.batch, args.tokens, args.steps, args.modes)
        assert args.device == "cuda"
        sizes.add((args.size, tuple(args.modes)))
    assert ("gpt2-small", bench.MODES) in sizes
    assert ("gpt2-medium", bench.MODES) in sizes
    assert ("gpt2-xl", ("lora", "full")) in sizes


# ------------------------------------- notebook 09's conclusions, on the committed files


def _committed_cpu_result() -> dict:
    return json.loads((ROOT / "results" / "bench-cpu-gpt2-small.json").read_text())


def test_notebook_09s_conclusions_hold_for_the_committed_cpu_measurement():
    result = _committed_cpu_result()
    modes, ratios = result["modes"], bench.ratios(result)
    memory = {mode: numbers["memory_breakdown_computed"] for mode, numbers in modes.items()}
    # time follows FLOPs: LoRA and the last block are faster than full fine-tuning, in that
    # order, and each FLOP ratio lies within the middle half of its per-round time ratio
    assert modes["last-block"]["step_seconds"] < modes["lora"]["step_seconds"]
    for mode in ("lora", "last-block"):
        per_round = ratios[f"{mode} / full step time"]
        assert bench.verdict(per_round).startswith("below 1"), mode
        flops = modes[mode]["flops_per_token"] / modes["full"]["flops_per_token"]
        assert per_round.low <= flops <= per_round.high, (mode, flops, per_round)
    # ours took 0.97 of PEFT's time, the whole middle half of the rounds below 1
    assert ratios["lora / peft-lora step time"].high < 1
    # frozen weights: no gradients or AdamW states, but every activation stays
    assert memory["lora"]["activations"] == pytest.approx(memory["full"]["activations"], rel=0.01)
    assert memory["last-block"]["activations"] < memory["lora"]["activations"]
    assert modes["last-block"]["peak_memory_bytes"] < modes["lora"]["peak_memory_bytes"]
    # merged: within the spread of the base and at most 1.02 of it; unmerged: slower
    merged, unmerged = ratios["merged / base inference"], ratios["unmerged / base inference"]
    assert merged.low <= 1 <= merged.high
    assert merged.median <= 1.02
    assert unmerged.low > 1


def test_nearly_all_of_loras_flops_are_the_frozen_bases():
    """09: the frozen weights (blocks and head, 4N) make 95 % of LoRA's FLOPs, the adapters 3 %."""
    cfg = bench.bench_config("gpt2-small")
    adapters = _committed_cpu_result()["modes"]["lora"]["trainable_params"]
    total = bench.flops_per_token(cfg, "lora", 64, adapters).total
    assert 4 * bench.matmul_params(cfg) / total > 0.95
    assert 6 * adapters / total < 0.035


def test_transformers_gelu_accounts_for_pefts_extra_activations():
    """09: transformers' gelu_new keeps 4 tensors where nn.GELU keeps 1; over 12 blocks that is
    the whole difference between PEFT's LoRA and ours (within 1 %)."""
    from transformers.activations import ACT2FN

    result = _committed_cpu_result()
    x = torch.randn(result["batch"], result["tokens"], 4 * 768, requires_grad=True)
    kept = {}
    for name, gelu in {"ours": nn.GELU(approximate="tanh"), "hf": ACT2FN["gelu_new"]}.items():
        with bench.count_saved_tensors(gelu) as saved:
            gelu(x)
        kept[name] = sum(saved.values())
    activations = {
        m: r["memory_breakdown_computed"]["activations"] for m, r in result["modes"].items()
    }
    measured = activations["peft-lora"] - activations["lora"]
    assert 12 * (kept["hf"] - kept["ours"]) == pytest.approx(measured, rel=0.01)


def test_lora_holds_under_30_percent_of_full_fine_tunings_state_small_and_xl():
    for size in ("gpt2-small", "gpt2-xl"):
        held = {
            mode: bench.memory_breakdown(
                bench.build_model(bench.bench_config(size), mode, torch.device("meta")), 0
            ).total
            for mode in ("lora", "full")
        }
        assert held["lora"] / held["full"] < 0.3, size


# ------------------------------------------------------------ accounting, by hand


@pytest.mark.parametrize(
    ("tokens", "adapters", "match"),
    [(0, 0, "tokens must be a positive integer"), (-5, 0, "tokens"), (64, -1, "adapter_params")],
)
def test_flops_per_token_refuses_counts_that_cannot_be(tokens, adapters, match):
    with pytest.raises(ValueError, match=match):
        bench.flops_per_token(bench.bench_config("tiny"), "lora", tokens, adapters)


def test_matmul_params_count_the_blocks_linears_and_the_head():
    assert bench.matmul_params(gpt2_config("gpt2-small")) == 84_934_656 + 38_597_376
    model = GPTModel(bench.bench_config("tiny"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert bench.matmul_params(model.cfg) == sum(m.weight.numel() for m in linears)


def test_flops_per_token_by_hand():
    cfg = bench.bench_config("tiny")  # d 64, 2 layers, vocab 512
    n = 12 * 2 * 64 * 64 + 64 * 512
    attention = 12 * 2 * 64 * 16  # 12 L d T at T = 16 tokens
    full = bench.flops_per_token(cfg, "full", 16)
    assert full == (2 * n + attention / 3, 4 * n + 2 * attention / 3)
    assert full.total == 6 * n + attention == 811_008
    lora = bench.flops_per_token(cfg, "lora", 16, adapter_params=1000)
    assert lora.total == 4 * n + 6 * 1000 + attention
    assert bench.flops_per_token(cfg, "peft-lora", 16, adapter_params=1000) == lora
    last = bench.flops_per_token(cfg, "last-block", 16)
    assert last.backward == 2 * 64 * 512 + 4 * 12 * 64 * 64 + 2 * 4 * 64 * 16
    with pytest.raises(ValueError, match="Unknown mode"):
        bench.flops_per_token(cfg, "qlora", 16)


def test_memory_breakdown_by_hand():
    layer = nn.Linear(4, 3)  # 12 weights + 3 biases, float32
    assert bench.memory_breakdown(layer, activations=7) == (60, 60, 120, 7)
    layer.weight.requires_grad_(False)
    assert bench.memory_breakdown(layer.double(), activations=0) == (120, 24, 48, 0)
    assert bench.memory_breakdown(layer, activations=5).total == 120 + 24 + 48 + 5


def test_saved_tensors_are_counted_once_and_without_the_weights():
    layer = nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4, requires_grad=True)
    with bench.count_saved_tensors(layer) as saved:
        y = layer(x)  # saves x (for the weight's gradient) and the weight (for x's)
        z = torch.tanh(y) * torch.tanh(y)  # tanh saves its output: two new (5, 3) tensors
    assert sum(saved.values()) == 5 * 4 * 4 + 2 * 5 * 3 * 4
    z.sum().backward()


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H100 80GB HBM3", 989.0), ("Tesla T4", 65.0), ("NVIDIA L4", 121.0)],
)
def test_peak_tflops_by_name(name, peak):
    assert bench.peak_tflops(name) == peak


def test_an_unknown_gpu_has_no_peak():
    assert bench.peak_tflops("NVIDIA L40S") is None


# ----------------------------------------------- LoRA's speed-up is bit-identical


def formula(self: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """LoRALayer.forward before the speed-up: always multiplied by the scaling."""
    return self.scaling * (self.dropout(x) @ self.A @ self.B)


def forward_and_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(x.dtype.is_floating_point)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return [out.detach(), *grads, *([x.grad] if x.grad is not None else [])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("rank", "alpha", "rslora"), [(4, 4, False), (4, 8, False), (4, 3, False), (4, 2, True)]
)
def test_a_lora_layer_gives_the_formulas_outputs_and_gradients_bit_for_bit(
    rank, alpha, rslora, dtype, monkeypatch
):
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 12, dtype=dtype), rank, alpha, rslora=rslora)
    nn.init.normal_(layer.lora.B)
    x = torch.randn(3, 5, 16, dtype=dtype)
    now = forward_and_grads(layer, x)
    monkeypatch.setattr(LoRALayer, "forward", formula)
    before = forward_and_grads(layer, x)
    assert all(torch.equal(a, b) for a, b in zip(now, before, strict=True))


@pytest.mark.parametrize(("rank", "alpha"), [(16, 16), (8, 16)])
def test_a_gpt_with_lora_gives_the_same_logits_and_gradients_bit_for_bit(rank, alpha, monkeypatch):
    torch.manual_seed(0)
    model = GPTModel({**bench.TINY_CONFIG, "drop_rate": 0.0})
    replace_linear_with_lora(model.trf_blocks, rank, alpha)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora.B, std=0.02)
    ids = torch.randint(512, (2, 16))
    now = forward_and_grads(model, ids)
    monkeypatch.setattr(LoRALayer, "forward", formula)
    before = forward_and_grads(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(now, before, strict=True))
