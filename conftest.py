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

# The slowest files first (measured on 2 cores): each xdist worker takes the next file when it
# has at most two tests of its own left, so starting with the long ones lets both workers
# finish at about the same time.
# run.py passes --no-loadscope-reorder, without which xdist (3.5 and later) sends the files out
# by their number of tests instead and this order is lost.
SLOWEST_FIRST = [
    "tests/test_browser.py",
    "notebooks/05_finetune_gpt2.ipynb",
    "notebooks/06_rank_alpha_targets.ipynb",
    "notebooks/08_beyond_lora.ipynb",
    "tests/test_claims_07_08.py",
    "notebooks/solutions/06_solutions.ipynb",
    "notebooks/07_intrinsic_rank.ipynb",
    "tests/test_claims_06.py",
    "notebooks/solutions/07_solutions.ipynb",
    "notebooks/03_attention_with_lora.ipynb",
    "notebooks/solutions/08_solutions.ipynb",
    "notebooks/09_speed_and_memory.ipynb",
    "tests/test_claims_02_03.py",
]


def pytest_collection_modifyitems(config, items):
    """Run the files of SLOWEST_FIRST first, in that order; the rest keep pytest's order."""
    root = Path(__file__).resolve().parent
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}

    def key(item) -> int:
        path = Path(str(item.fspath)).resolve()
        return rank.get(path.relative_to(root).as_posix(), len(rank))

    items.sort(key=key)
