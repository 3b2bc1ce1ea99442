"""JupyterLab in headless Chromium, for tests/test_browser.py.

`JupyterLab` starts a `jupyter lab` server on loopback and stops it; `open_browser`
starts Debian's Chromium through Playwright (never a downloaded browser); `open_lab`
loads JupyterLab in a page once, and `check_sliders` opens one notebook there, runs its
cells, checks that every widget renders and that moving each slider changes the output
below it, then closes the notebook and its kernel. The committed notebook is never
saved: autosave is off in the server's throwaway settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "browser-screenshots"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# The flags that keep Chromium quiet on a machine with no network (and as root).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRACEBACK = "Traceback (most recent call last)"
WIDGET_ERRORS = ("Error displaying widget", "Loading widget...", "Failed to load model class")
SLIDER_SOURCE = re.compile(r"\bipywidgets\b|\bwidgets\.\w|\binteract(ive|ive_output)?\b")
# Throwaway JupyterLab settings: never write the notebook back; render every cell.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def find_chromium() -> str | None:
    """Path of a Chromium binary: $LORA_CHROMIUM, else Debian's package, else None."""
    wanted = os.environ.get("LORA_CHROMIUM")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def slider_notebooks(root: Path = ROOT) -> list[Path]:
    """Notebooks under notebooks/ whose code uses ipywidgets or interact, sorted."""
    found = []
    for path in sorted((root / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = ("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        if any(SLIDER_SOURCE.search(src) for src in code):
            found.append(path)
    return found


def last_cell_to_run(notebook: Path) -> int:
    """Index (among all cells) of the last code cell that uses ipywidgets or interact.

    The last cell of the notebook if none does (the check then reports no widgets).
    """
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    found = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "code" and SLIDER_SOURCE.search("".join(c["source"]))
    ]
    return found[-1] if found else len(cells) - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A `jupyter lab` server on 127.0.0.1 with a token, serving `root`, in throwaway dirs."""

    def __init__(self, root: Path = ROOT, timeout: float = 90.0) -> None:
        self.root, self.timeout = root, timeout
        self.port, self.token = free_port(), os.urandom(16).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-jupyterlab-")
        self.log = Path(self._tmp.name) / "server.log"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> JupyterLab:
        tmp = Path(self._tmp.name)
        for name, values in LAB_SETTINGS.items():
            path = tmp / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "IPYTHONDIR": str(tmp / "ipython"),
        }
        args = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            "--allow-root",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.user_settings_dir={tmp / 'settings'}",
            f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
            f"--FileCheckpoints.checkpoint_dir={tmp / 'checkpoints'}",  # not in the repository
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
        ]
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.api("status"), timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(
            f"jupyter lab did not answer in {self.timeout:.0f} s:\n{self.log_tail()}"
        )

    def api(self, path: str) -> str:
        return f"{self.url}/api/{path}?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):  # a clean stop also shuts the kernels down
                request = urllib.request.Request(self.api("shutdown"), method="POST")
                urllib.request.urlopen(request, timeout=10).close()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._tmp.cleanup()


@contextlib.contextmanager
def open_browser(chromium: str) -> Iterator[object]:
    """A Playwright browser context in Chromium at `chromium`, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory(prefix="lora-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


# Opens `path` in the app, waits for its kernel, runs all cells; returns what ran.
OPEN_AND_RUN_JS = """
async ([path, upto]) => {
  const app = window.jupyterapp;
  await app.started;
  await app.restored;
  const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await panel.context.ready;
  await panel.sessionContext.ready;
  await panel.revealed;
  window.__loraPanel = panel;
  window.__loraSaves = 0;  // the test must never write the notebook back
  panel.context.saveState.connect((_, state) => { if (state === 'started') window.__loraSaves++; });
  // Cells 0..upto hold every widget; the ones below them are nbval's to check.
  if (upto + 1 < panel.content.widgets.length) {
    panel.content.activeCellIndex = upto + 1;
    return await app.commands.execute('notebook:run-all-above');
  }
  return await app.commands.execute('notebook:run-all-cells');
}
"""

# Kernel state and per-cell facts: widget outputs in the model vs rendered ones.
STATE_JS = """
() => {
  const panel = window.__loraPanel;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.map((cell, index) => {
    cell.node.dataset.loraCell = String(index);
    const model = cell.model;
    if (model.type !== 'code') return {index, code: false};
    const outputs = [];
    for (let i = 0; i < model.outputs.length; i++) {
      const out = model.outputs.get(i);
      outputs.push({type: out.type, widget: 'application/vnd.jupyter.widget-view+json' in (out.data || {}),
                    error: out.type === 'error' ? `${out.toJSON().ename}: ${out.toJSON().evalue}` : null});
    }
    const children = Array.from(cell.outputArea.node.querySelectorAll(':scope > .jp-OutputArea-child'));
    // A widget that failed shows an error icon; a click on it reveals the message.
    cell.node.querySelectorAll('.jupyter-widgets-error-widget.icon-error')
      .forEach(icon => icon.parentElement.click());
    const rendered = children.map(child => ({
      widget: child.querySelector('.jupyter-widgets') !== null,
      error: child.querySelector('.jupyter-widgets-error-widget') !== null,
      text: child.innerText,
    }));
    const tags = model.getMetadata('tags') || [];
    return {index, code: true, count: model.executionCount, running: cell.promptNode
            ? cell.promptNode.innerText.includes('*') : false,
            raises: tags.includes('raises-exception'), outputs, rendered,
            sliders: cell.node.querySelectorAll('.widget-slider').length};
  });
  return {status: kernel ? kernel.status : 'none', cells};
}
"""

# What a slider move must change: the content of every Output widget in the cell (its
# text, images and SVG; not its markup, whose style attributes change on every redraw).
OUTPUT_SNAPSHOT_JS = """
(index) => {
  const cell = document.querySelector(`[data-lora-cell="${index}"]`);
  const outs = Array.from(cell.querySelectorAll('.widget-output'));
  const text = outs.map(o => o.innerText).join('\\n');
  const pictures = outs.flatMap(o => Array.from(o.querySelectorAll('img, svg'))
    .map(e => e.tagName === 'IMG' ? e.src : e.outerHTML));
  return {n: outs.length, content: [text, ...pictures].join('\\n'), text,
          status: window.__loraPanel.sessionContext.session.kernel.status};
}
"""

CLOSE_JS = """
async () => {
  const panel = window.__loraPanel;
  if (!panel) return;
  await panel.sessionContext.shutdown();
  panel.context.model.dirty = false;
  panel.dispose();
}
"""


@dataclass
class SliderReport:
    notebook: str
    widgets: int
    sliders_moved: int
    screenshot: Path
    problems: list[str]


def _wait_for(page, js: str, arg: object, done, timeout: float, what: str) -> object:
    """Evaluate `js` until `done(result)`; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = page.evaluate(js, arg) if arg is not None else page.evaluate(js)
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def _settled_output(page, index: int, timeout: float, quiet: float = 1.0) -> dict:
    """The cell's Output widgets once the kernel is idle and they stop changing for `quiet` s."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        snap = page.evaluate(OUTPUT_SNAPSHOT_JS, index)
        if snap != last:
            last, since = snap, time.monotonic()
        elif snap["status"] == "idle" and time.monotonic() - since >= quiet:
            return snap
        time.sleep(0.1)
    raise TimeoutError(f"cell {index}: output still changing after {timeout:.0f} s")


def _output_after_move(page, index: int, before: dict, timeout: float) -> dict:
    """The cell's Output widgets after a slider move: as soon as they differ from `before`,
    once settled (0.5 s quiet); if they never change, once they stayed as they were, with
    the kernel idle, for 1.5 s."""
    deadline = time.monotonic() + timeout
    since = time.monotonic()
    while time.monotonic() < deadline:
        snap = page.evaluate(OUTPUT_SNAPSHOT_JS, index)
        if snap["content"] != before["content"]:
            return _settled_output(page, index, max(deadline - time.monotonic(), 1.0), 0.5)
        if snap["status"] != "idle":
            since = time.monotonic()
        elif time.monotonic() - since >= 1.5:
            return snap
        time.sleep(0.1)
    raise TimeoutError(f"cell {index}: output still changing after {timeout:.0f} s")


def _move_slider(page, handle) -> bool:
    """Press an arrow key on a slider handle; True if its value changed."""
    before = handle.get_attribute("aria-valuenow")
    for key in ("ArrowRight", "ArrowLeft", "ArrowLeft"):
        handle.focus()
        page.keyboard.press(key)
        if handle.get_attribute("aria-valuenow") != before:
            return True
    return False


def open_lab(context, server: JupyterLab, timeout: float = 60.0):
    """A page of `context` with JupyterLab from `server` loaded, for check_sliders to reuse."""
    page = context.new_page()
    try:
        page.goto(f"{server.url}/lab?reset&token={server.token}")
        page.wait_for_function("window.jupyterapp !== undefined", timeout=timeout * 1000)
    except BaseException:
        page.close()
        raise
    return page


def check_sliders(
    page, server: JupyterLab, notebook: Path, shots: Path = SCREENSHOTS, timeout: float = 300.0
) -> SliderReport:
    """Run `notebook` in the JupyterLab of `page` (see open_lab); check its widgets render
    and its sliders drive outputs. The notebook and its kernel are closed at the end.

    Runs the cells down to the last one with a widget: the cells below it hold no slider,
    and nbval runs them anyway.
    """
    rel = notebook.resolve().relative_to(server.root.resolve()).as_posix()
    problems: list[str] = []
    widgets = moved = 0
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"{notebook.stem}.png"
    try:
        upto = last_cell_to_run(notebook)
        page.evaluate(OPEN_AND_RUN_JS, [rel, upto])
        state = _wait_for(
            page,
            STATE_JS,
            None,
            lambda s: s["status"] == "idle" and not any(c.get("running") for c in s["cells"]),
            timeout,
            "the kernel to finish running all cells",
        )

        with contextlib.suppress(TimeoutError):  # widgets render a moment after their output
            state = _wait_for(page, STATE_JS, None, _widgets_settled, 30, "widgets to render")
        problems += _problems_in(state, upto)
        widgets = sum(o["widget"] for c in state["cells"] if c["code"] for o in c["outputs"])
        if widgets == 0:
            problems.append(
                "no widget output at all (does the notebook still display its sliders?)"
            )
        for cell in (c for c in state["cells"] if c.get("sliders")):
            moved += _check_cell_sliders(page, cell["index"], problems)
        if widgets and not moved and not problems:
            problems.append("widgets rendered but no slider was found to move")
        if page.evaluate("window.__loraSaves"):
            problems.append("JupyterLab saved the notebook during the test (autosave is on?)")
        first = page.locator(".widget-slider").first
        if first.count():
            first.scroll_into_view_if_needed()
    finally:
        page.screenshot(path=str(shot))
        with contextlib.suppress(Exception):
            page.evaluate(CLOSE_JS)
        problems += _close_dialogs(page)  # the page is reused: leave nothing open for the next
    return SliderReport(rel, widgets, moved, shot, problems)


def _close_dialogs(page) -> list[str]:
    """Dismiss the dialogs JupyterLab left open (a dead kernel's "Kernel Restarting", say),
    which would take the keyboard from the next notebook's sliders; one problem each."""
    problems = []
    dialogs = page.locator(".jp-Dialog")
    for _ in range(5):
        if not dialogs.count():
            break
        problems.append(f"a dialog was left open: {dialogs.first.inner_text()[:200]!r}")
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    return problems


def _widgets_settled(state: dict) -> bool:
    """Every widget output shows a widget view (or a widget's error view), none still loading."""
    return all(
        len(c["rendered"]) == len(c["outputs"])
        and all(
            r["widget"] for o, r in zip(c["outputs"], c["rendered"], strict=True) if o["widget"]
        )
        and not any("Loading widget..." in r["text"] for r in c["rendered"])
        for c in state["cells"]
        if c["code"]
    )


def _problems_in(state: dict, upto: int | None = None) -> list[str]:
    """Errors, unrun cells (down to cell `upto`) and widgets that did not render, one line each."""
    problems = []
    for c in state["cells"]:
        if not c["code"] or (upto is not None and c["index"] > upto):
            continue
        where = f"cell {c['index']}"
        if c["count"] is None:
            problems.append(f"{where} did not run (an earlier cell failed?)")
        for o in c["outputs"]:
            if o["error"] and not c["raises"]:
                problems.append(f"{where} raised {o['error']}")
        if len(c["rendered"]) != len(c["outputs"]):
            problems.append(f"{where}: {len(c['rendered'])} of {len(c['outputs'])} outputs shown")
        for o, r in zip(c["outputs"], c["rendered"], strict=False):
            if o["widget"] and not r["widget"]:
                problems.append(f"{where}: a widget output did not render: {r['text'][:200]!r}")
        for r in c["rendered"]:
            if r["error"]:
                problems.append(f"{where} shows a widget error: {r['text'][:300]!r}")
            for e in WIDGET_ERRORS:
                if e in r["text"]:
                    problems.append(f"{where} shows {e!r}: {r['text'][:200]!r}")
            if TRACEBACK in r["text"] and not c["raises"]:
                problems.append(f"{where} shows a traceback: {r['text'][-300:]!r}")
    return problems


def _check_cell_sliders(page, index: int, problems: list[str]) -> int:
    """Move each slider of cell `index` one step; its Output widgets must change."""
    cell = page.locator(f'[data-lora-cell="{index}"]')
    handles = cell.locator(".widget-slider [role=slider]")
    moved = 0
    for k in range(handles.count()):
        handle = handles.nth(k)
        handle.scroll_into_view_if_needed()
        before = _settled_output(page, index, 60)  # late output of the last move lands here
        if before["n"] == 0:
            problems.append(f"cell {index}: a slider has no output widget below it")
            return moved
        if not _move_slider(page, handle):
            problems.append(f"cell {index}: slider {k} did not move with the arrow keys")
            continue
        after = _output_after_move(page, index, before, 60)
        if after["content"] == before["content"]:
            problems.append(f"cell {index}: moving slider {k} did not change the output below it")
        elif TRACEBACK in after["text"]:
            problems.append(f"cell {index}: moving slider {k} raised: {after['text'][-300:]!r}")
        moved += 1
    return moved


def rise_slides(context, server: JupyterLab, notebook: Path, timeout: float = 60.0) -> list[str]:
    """Open `notebook` in jupyterlab_rise's slideshow; the first line of text of each slide."""
    rel = notebook.resolve().relative_to(server.root.resolve()).as_posix()
    page = context.new_page()
    try:
        page.goto(f"{server.url}/rise/{rel}?token={server.token}")
        page.wait_for_selector(".reveal .slides > section", timeout=timeout * 1000)
        return page.evaluate(
            """() => Array.from(document.querySelectorAll('.reveal .slides > section'))
                 .map(s => (s.textContent || '').trim().split('\\n')[0])"""
        )
    finally:
        page.close()
