"""Set up and run the series: `python3 run.py lab` or `python3 run.py test`.

Creates a virtual environment in .venv (unless you already run inside a venv or a
conda environment), installs the project into it when pyproject.toml changed, then
opens JupyterLab on notebooks/ or runs every test (unit tests and all notebooks).
Extra arguments go to JupyterLab or pytest.

`test` without arguments runs the numbered notebooks twice: once as they are, then
again with another CPU's kernels, so that a committed number that depends on the
machine fails here rather than on a learner's laptop. Tests compute on one thread per
pytest worker.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def in_managed_env() -> bool:
    """True inside an activated venv or conda environment: use it as it is."""
    return sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix


def python_of_venv() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_installed(python: Path, with_tests: bool) -> None:
    """pip install -e . (or .[test]) once per version of pyproject.toml."""
    prefix = subprocess.check_output([python, "-c", "import sys; print(sys.prefix)"], text=True)
    stamps = {
        name: Path(prefix.strip()) / f".lora-from-scratch-{name}" for name in ("core", "test")
    }
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    wanted = ["test"] if with_tests else ["core", "test"]
    if any(stamps[n].exists() and stamps[n].read_text() == digest for n in wanted):
        return
    target = ".[test]" if with_tests else "."
    print(f"Installing {target} into {prefix.strip()} ...", flush=True)
    subprocess.check_call([python, "-m", "pip", "install", "--upgrade", "pip"])
    subprocess.check_call([python, "-m", "pip", "install", "-e", target], cwd=ROOT)
    stamps[wanted[0]].write_text(digest)


def lab_command(python: Path, rest: list[str]) -> list[str | Path]:
    """JupyterLab serving the repository, its file browser opened on notebooks/."""
    args = [python, "-m", "jupyter", "lab", f"--ServerApp.root_dir={ROOT}"]
    args.append("--FileContentsManager.preferred_dir=notebooks")
    # Default settings for the series (overrides.json there): no "get notified about official
    # Jupyter news?" pop-up and no update check, which a class, often offline, does not need.
    args.append(f"--LabApp.app_settings_dir={ROOT / 'lora_helpers' / 'lab_settings'}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # containers and classroom VMs often run as root
    return [*args, *rest]


# Two pytest workers, each notebook whole on one of them (its cells share one kernel). Files
# go out in collection order, the slowest first (conftest.py), not in xdist's default order by
# number of tests, which left a 50 s notebook for the end of the second pass.
PARALLEL = ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"]


def other_kernels(python: Path) -> dict[str, str]:
    """Settings that make torch, oneDNN and MKL use kernels other than this CPU's best.

    AVX-512 machines get AVX2 kernels; every other machine gets the generic ones.
    Each gives different round-off, which is what the second notebook pass is for.
    """
    best = subprocess.check_output(
        [python, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], text=True
    ).strip()
    if best.startswith("AVX512"):
        return {
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        }
    return {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    }


def run_tests(python: Path, rest: list[str]) -> int:
    """pytest with pyproject's settings; without arguments, then the notebooks again (see above).

    Each worker computes on one thread: two workers on two cores, each running a
    multi-threaded kernel, slow each other down many times over.
    """
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = subprocess.call([python, "-m", "pytest", *PARALLEL, *rest], cwd=ROOT, env=one_thread)
    if code or rest:
        return code
    settings = other_kernels(python)
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"\nSecond pass: the numbered notebooks again with {shown}", flush=True)
    numbered = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
    )
    env = {**one_thread, **settings}
    return subprocess.call([python, "-m", "pytest", *PARALLEL, *numbered], cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("lab", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if in_managed_env():
        python = Path(sys.executable)
    else:
        if not python_of_venv().exists():
            print(f"Creating a virtual environment in {VENV} ...", flush=True)
            venv.create(VENV, with_pip=True)
        python = python_of_venv()
    ensure_installed(python, with_tests=command == "test")
    if command == "test":
        return run_tests(python, rest)
    return subprocess.call(lab_command(python, rest), cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
