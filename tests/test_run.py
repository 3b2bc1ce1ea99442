"""The README's two commands: `run.py lab` serves the series, `run.py` explains itself."""

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from browser_support import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402


def test_without_a_command_it_prints_the_usage():
    result = subprocess.run([sys.executable, "run.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "python3 run.py lab" in result.stdout


def test_lab_serves_the_notebooks_and_opens_on_them(tmp_path):
    port, token = free_port(), secrets.token_hex(8)
    command = run.lab_command(Path(sys.executable), ["--no-browser", f"--port={port}"])
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                with urllib.request.urlopen(
                    f"{base}/api/contents/notebooks?token={token}"
                ) as response:
                    listing = json.load(response)
                break
            except OSError:
                assert server.poll() is None, "jupyter lab exited before it answered"
                time.sleep(0.5)
        else:
            raise AssertionError("jupyter lab did not answer within 60 s")
        names = {item["name"] for item in listing["content"]}
        assert {"01_low_rank.ipynb", "02_lora_layer.ipynb", "solutions"} <= names
        with urllib.request.urlopen(f"{base}/lab?token={token}") as response:
            assert '"preferredPath": "notebooks"' in response.read().decode()
        # no "get notified about official Jupyter news?" pop-up: lora_helpers/lab_settings
        setting = "@jupyterlab/apputils-extension:notification"
        with urllib.request.urlopen(f"{base}/lab/api/settings/{setting}?token={token}") as response:
            defaults = json.load(response)["schema"]["properties"]
        assert defaults["fetchNews"]["default"] == "false", "JupyterLab would ask about news"
        assert defaults["checkForUpdates"]["default"] is False
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_second_notebook_pass_really_uses_other_kernels():
    best = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    here = torch.backends.cpu.get_cpu_capability()  # this process was started without them
    settings = run.other_kernels(Path(sys.executable))
    assert set(settings) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}
    env = {**os.environ, **settings}
    there = subprocess.check_output([sys.executable, "-c", best], text=True, env=env).strip()
    assert there != here, (
        f"ATEN_CPU_CAPABILITY={settings['ATEN_CPU_CAPABILITY']} left torch on {here}"
    )


def test_the_slowest_first_list_names_files_that_exist():
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    missing = [name for name in root_conftest.SLOWEST_FIRST if not (ROOT / name).is_file()]
    assert not missing, f"conftest.SLOWEST_FIRST names files that are gone: {missing}"


def test_files_go_to_the_workers_in_collection_order(tmp_path):
    """run.PARALLEL keeps conftest's slowest-first order: xdist's default (3.5 and later) would
    send a file with more tests first, here b before a."""
    log = tmp_path / "order.txt"
    (tmp_path / "test_a.py").write_text(f"def test_a():\n    open({str(log)!r}, 'a').write('a')\n")
    (tmp_path / "test_b.py").write_text(
        "import pytest\n\n\n@pytest.mark.parametrize('i', range(3))\n"
        f"def test_b(i):\n    open({str(log)!r}, 'a').write('b')\n"
    )
    one_worker = [*run.PARALLEL, "-n", "1"]  # the last -n wins: one worker, a strict order
    command = [sys.executable, "-m", "pytest", "-q", "-p", "xdist", *one_worker, "test_a.py"]
    # Only xdist: loading every installed plugin (nbval's imports) took 5 of the 6 seconds.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    subprocess.run(
        [*command, "test_b.py"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120
    )
    assert log.read_text() == "abbb"
