"""Sliders work where learners meet them: in JupyterLab, in a real browser.

For every notebook under notebooks/ that uses ipywidgets, start `jupyter lab` on
loopback, open the notebook in headless Chromium (Debian's package, driven by
Playwright; no browser is downloaded), run its cells down to the last one with a
widget (nbval runs them all), check that every widget renders and that moving each
slider changes the output below it. A screenshot of
each notebook lands in build/browser-screenshots/. The notebooks are never saved.
Skipped, saying why, only where Chromium or Playwright is missing.
"""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from browser_support import (
    ROOT,
    JupyterLab,
    check_sliders,
    find_chromium,
    last_cell_to_run,
    open_browser,
    open_lab,
    rise_slides,
    slider_notebooks,
)

CHROMIUM = find_chromium()
NOTEBOOKS = slider_notebooks()


@pytest.fixture(scope="module")
def browser():
    """A Playwright browser context in Chromium, shared by the tests of this file."""
    if CHROMIUM is None:
        pytest.skip(
            "Chromium not found: install Debian's `chromium` package (.ci/run does) "
            "or set LORA_CHROMIUM to a Chromium binary."
        )
    pytest.importorskip("playwright.sync_api", reason="Playwright missing: pip install -e .[test]")
    with open_browser(CHROMIUM) as context:
        yield context


@pytest.fixture(scope="module")
def lab():
    """`jupyter lab` serving the repository."""
    with JupyterLab(ROOT) as server:
        yield server


@pytest.fixture(scope="module")
def page(browser, lab):
    """One page with JupyterLab loaded; each check opens its notebook there, then closes it."""
    page = open_lab(browser, lab)
    yield page
    page.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_series_has_slider_notebooks():
    assert NOTEBOOKS, "no notebook under notebooks/ uses ipywidgets, so nothing is tested here"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_widgets_render_and_sliders_update_their_output(page, lab, notebook):
    before = sha256(notebook)
    report = check_sliders(page, lab, notebook)
    assert sha256(notebook) == before, f"{report.notebook} changed on disk during the test"
    assert not report.problems, (
        f"{report.notebook} (screenshot: {report.screenshot}):\n" + "\n".join(report.problems)
    )
    assert report.sliders_moved > 0


def code(source: str) -> dict:
    return {
        "cell_type": "code",
        "metadata": {},
        "source": source,
        "outputs": [],
        "execution_count": None,
    }


BROKEN_NOTEBOOK = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
    },
    "cells": [
        code("import ipywidgets\nfrom ipywidgets import interact\nfrom traitlets import Unicode"),
        code("_ = interact(lambda r: print('r squared is', r * r), r=(1, 5))"),
        code("_ = interact(lambda r: print('always the same'), r=(1, 5))"),
        code(
            "class Missing(ipywidgets.DOMWidget):\n"
            "    _model_name = Unicode('NoSuchModel').tag(sync=True)\n"
            "    _model_module = Unicode('no-such-module').tag(sync=True)\n"
            "    _view_name = Unicode('NoSuchView').tag(sync=True)\n"
            "    _view_module = Unicode('no-such-module').tag(sync=True)\n"
            "\n"
            "Missing()"
        ),
        code("raise RuntimeError('below the last widget: the slider check never runs this')"),
    ],
}


@pytest.fixture
def scratch():
    """A folder under build/ (git-ignored), where the shared server sees notebooks written."""
    (ROOT / "build").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="browser-check-", dir=ROOT / "build"))
    yield folder
    shutil.rmtree(folder)


def write_notebook(path: Path, *sources: str) -> Path:
    """A notebook of these code cells, with BROKEN_NOTEBOOK's metadata, at `path`."""
    path.write_text(json.dumps({**BROKEN_NOTEBOOK, "cells": [code(s) for s in sources]}))
    return path


def test_the_check_catches_a_dead_slider_and_a_widget_that_cannot_render(page, lab, scratch):
    notebook = scratch / "broken.ipynb"
    notebook.write_text(json.dumps(BROKEN_NOTEBOOK))
    report = check_sliders(page, lab, notebook, shots=scratch)
    problems = "\n".join(report.problems)
    assert report.sliders_moved == 2, problems
    assert "cell 1" not in problems, problems
    assert "cell 2: moving slider 0 did not change the output below it" in problems
    assert "cell 3 shows a widget error" in problems, problems
    assert "Failed to load model class 'NoSuchModel'" in problems, problems
    assert "cell 4" not in problems, problems  # below the last widget: left to nbval


def test_widget_cells_are_found_however_ipywidgets_is_imported(tmp_path):
    notebook = write_notebook(
        tmp_path / "widgets.ipynb",
        "import ipywidgets as widgets\nfrom ipywidgets import interactive_output",
        "s = widgets.IntSlider()",
        "display(interactive_output(lambda x: print(x), {'x': s}))",
        "print('no widget here')",
    )
    assert last_cell_to_run(notebook) == 2


def test_a_kernel_that_dies_is_reported_and_the_next_notebook_still_checks(page, lab, scratch):
    """The page is shared: a dead kernel's dialog must not take the next notebook's sliders."""
    dies = write_notebook(
        scratch / "dies.ipynb",
        "import os\nfrom ipywidgets import IntSlider, interact",
        "_ = interact(lambda r: os._exit(1) if r != 1 else print(r), r=IntSlider(1, 1, 5))",
    )
    works = write_notebook(
        scratch / "works.ipynb",
        "from ipywidgets import interact",
        "_ = interact(lambda r: print('r squared is', r * r), r=(1, 5))",
    )
    first = check_sliders(page, lab, dies, shots=scratch)
    assert first.problems, "a kernel that died while a slider moved went unreported"
    second = check_sliders(page, lab, works, shots=scratch)
    assert not second.problems, second.problems
    assert second.sliders_moved == 1


def test_rise_presents_a_notebook_as_slides(browser, lab):
    notebook = ROOT / "notebooks" / "00_setup_check.ipynb"
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    kinds = [c["metadata"].get("slideshow", {}).get("slide_type") for c in cells]
    expected = kinds.count("slide") + (kinds[0] != "slide")  # cells before the first slide
    slides = rise_slides(browser, lab, notebook)
    assert len(slides) == expected, slides
