"""Shared code for the "LoRA from Scratch" notebooks: one module per concept.

lora       LoRALayer, LinearWithLoRA, replace_linear_with_lora, counting, LoRA state dicts
attention  causal multi-head attention with separate Q/K/V/O projections
explore    pure functions behind the sliders of notebooks 01-02
plots      the figures of notebooks 01-03
toy_tasks  the small tasks notebooks 02-03 train in seconds
assets     the one place that downloads and caches files (checksums, atomic writes)
gpt2       GPT-2 from scratch, its weights, tokenizer, generation, classifier head
data       the SMS Spam Collection and the tiny offline dataset, as DataLoaders
train      device choice, the fine-tuning loop and its measurements
baselines  majority class, length rule and bag of words for the spam data
protocol   several seeds, each method at its own learning rate, verdicts outside the spread
adapters   save, load, merge, swap and combine LoRA adapters
peft_format PEFT's LoRA format both ways, and our GPT-2 base in transformers
studies    the tiny transformer behind notebooks 06-08: rank, alpha, targets, intrinsic rank
dora       DoRA from scratch
quant      4-bit (int4 / NF4) blockwise quantisation and LoRA on a quantised base
kit        the offline classroom kit: download every asset into one folder
bench      speed and memory of LoRA, full fine-tuning, the last block and PEFT's LoRA
memory     the bytes a training step holds, by part: full, LoRA, QLoRA, GPT-2 to a 7B shape
claims     the popular claims notebook 04 checks, rebuilt as their sources describe them
"""

__version__ = "0.1.0"
