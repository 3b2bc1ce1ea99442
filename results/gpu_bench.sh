#!/usr/bin/env bash
# The GPU measurements of issue 13, in one go, on one CUDA GPU (see results/README.md):
#   1. the benchmark at gpt2-small and gpt2-medium (all four modes);
#   2. peak memory of LoRA and of full fine-tuning at gpt2-xl;
#   3. notebook 05 in its full recipe (it picks that recipe itself on a CUDA GPU).
# Each writes its JSON and PNG into results/, named with the GPU; commit them.
# Run from anywhere: bash results/gpu_bench.sh   (PYTHON=... to use another interpreter)
# Without network, notebook 05 needs the offline kit: LORA_ASSETS_PATH=DIR, where DIR comes
# from `python -m lora_helpers.kit download DIR`. With GPT-2 small's weights there it
# fine-tunes GPT-2 small; without them its fallback model, and the file names say -fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')"

"$PYTHON" -m lora_helpers.bench --size gpt2-small --batch 8 --tokens 64 --steps 50 --device cuda --out results
"$PYTHON" -m lora_helpers.bench --size gpt2-medium --batch 8 --tokens 64 --steps 30 --device cuda --out results
"$PYTHON" -m lora_helpers.bench --size gpt2-xl --batch 8 --tokens 64 --steps 5 --device cuda --modes lora full --out results

# Notebook 05 writes results/05_finetune_<gpu>[-fallback].json and .png itself; its executed
# copy goes to a scratch folder so that the committed (CPU) outputs stay as they are.
scratch="$(mktemp -d)"
"$PYTHON" -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=3600 \
    --output-dir "$scratch" notebooks/05_finetune_gpt2.ipynb
echo "notebook 05 ran; its executed copy is in $scratch"
ls -l results/
