"""Test-wide settings, also inherited by the notebook kernels that nbval starts.

- The committed notebook outputs come from the reduced mode (no pretrained GPT-2
  weights), so the tests run in it too, even where weights are cached.
- ../shared/assets (offline copies of the tokenizer and dataset, present in CI) is
  used when it exists; nothing requires it.
"""

import os
from pathlib import Path

SHARED_ASSETS = Path(__file__).resolve().parents[1] / "shared" / "assets"

os.environ["LORA_PRETRAINED"] = "0"
if SHARED_ASSETS.is_dir():
    paths = [p for p in os.environ.get("LORA_ASSETS_PATH", "").split(os.pathsep) if p]
    os.environ["LORA_ASSETS_PATH"] = os.pathsep.join([*paths, str(SHARED_ASSETS)])
