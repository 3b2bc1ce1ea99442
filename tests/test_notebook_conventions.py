"""Every notebook follows CONTRIBUTING.md: Colab badge, set-up cell, clean outputs, slides, exercises.

nbval checks that the committed outputs are reproduced; these tests check what nbval
does not: the shape of each notebook and the hygiene of what was committed.
"""

import importlib.metadata
import re
import sys
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
COLAB = "https://colab.research.google.com/github/lora-from-scratch/lora-from-scratch/blob/main/"
NUMBERED = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
# An absolute local path: /home/…, /tmp/…, C:\… (not a URL's path, not a relative one).
ABSOLUTE_PATH = re.compile(
    r"file:///|(?<![\w.:/~-])(?:/(?:home|root|tmp|work|Users|usr|opt|var|mnt|private)/|[A-Za-z]:\\\\?\w)"
)
TEXT_MIME = ("text/plain", "text/html", "text/markdown", "text/latex")


def setup_cell() -> str:
    """The set-up cell's source, as CONTRIBUTING.md spells it."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    block = re.search(r"the second is the set-up cell.*?```python\n(.*?)\n\s*```", text, re.S)
    assert block, "CONTRIBUTING.md no longer shows the set-up cell in a ```python block"
    return "\n".join(line.removeprefix("  ") for line in block.group(1).splitlines())


def read(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def output_texts(cell: dict):
    """Every text a code cell's outputs show (streams, text reprs, tracebacks)."""
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            yield out["text"]
        elif out["output_type"] == "error":
            yield "\n".join(out["traceback"])
        else:
            for mime in TEXT_MIME:
                if mime in out.get("data", {}):
                    value = out["data"][mime]
                    yield value if isinstance(value, str) else "".join(value)


numbered = pytest.mark.parametrize("path", NUMBERED, ids=rel)
every = pytest.mark.parametrize("path", NUMBERED + SOLUTIONS, ids=rel)


def test_the_series_has_numbered_notebooks():
    assert NUMBERED, "no notebooks/NN_*.ipynb found"


def test_the_setup_cell_is_found_in_contributing():
    assert 'if "google.colab" in sys.modules:' in setup_cell()


@numbered
def test_first_cell_is_a_colab_badge_for_this_notebook(path):
    first = read(path).cells[0]
    url = COLAB + rel(path)
    assert first.cell_type == "markdown", "the first cell must be the Colab badge (markdown)"
    assert f"]({url})" in first.source, f"the first cell must link the Colab badge to {url}"
    assert "colab-badge.svg" in first.source, "the first cell must show the Colab badge image"


@numbered
def test_second_cell_is_the_setup_cell_verbatim(path):
    second = read(path).cells[1]
    assert second.cell_type == "code"
    assert second.source.strip() == setup_cell().strip(), (
        "the second cell must be the set-up cell from CONTRIBUTING.md, unchanged"
    )


@every
def test_kernelspec_is_python3(path):
    assert read(path).metadata.get("kernelspec", {}).get("name") == "python3"


@every
def test_executed_top_to_bottom_in_a_fresh_kernel(path):
    counts = [c.execution_count for c in read(path).cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"execution counts are {counts}: run the notebook top to bottom in a fresh kernel"
    )


@every
def test_no_error_outputs_unless_tagged_raises_exception(path):
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type != "code" or "raises-exception" in tags(cell):
            continue
        for out in cell.outputs:
            assert out.output_type != "error", (
                f"cell {i} raised {out.ename}: {out.evalue} (tag it raises-exception if on purpose)"
            )


@every
def test_no_absolute_local_paths_in_outputs(path):
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type != "code":
            continue
        for text in output_texts(cell):
            found = ABSOLUTE_PATH.search(text)
            assert not found, (
                f"cell {i} prints an absolute path near {text[max(found.start() - 40, 0) : found.end() + 40]!r}:"
                " print paths relative to the repository"
            )


@numbered
def test_slide_metadata_on_every_cell(path):
    nb = read(path)
    title = next(
        (
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "markdown" and "\n# " in f"\n{c.source}"
        ),
        None,
    )
    assert title is not None, "no title cell (a markdown cell with a `# ` heading)"
    for i, cell in enumerate(nb.cells):
        is_slide = i == title or (cell.cell_type == "markdown" and cell.source.startswith("## "))
        wanted = "skip" if i == 1 else "slide" if is_slide else "-"
        got = cell.metadata.get("slideshow", {}).get("slide_type")
        assert got == wanted, (
            f"cell {i} has slide_type {got!r}, CONTRIBUTING.md asks for {wanted!r}"
        )


@numbered
def test_ends_with_exercises_and_has_solutions(path):
    if path.name.startswith("00_"):
        pytest.skip("exercises are optional for the set-up check")
    headings = [
        c.source.splitlines()[0]
        for c in read(path).cells
        if c.cell_type == "markdown" and c.source.startswith("## ")
    ]
    assert "## Exercises" in headings, "no `## Exercises` section"
    assert headings[-1] == "## Exercises", (
        f"`## Exercises` must be the last section, not {headings[-1]!r}"
    )
    solutions = path.parent / "solutions" / f"{path.name[:2]}_solutions.ipynb"
    assert solutions.exists(), f"missing {rel(solutions)}"


def test_colab_links_in_the_docs_point_at_existing_notebooks():
    for doc in ("README.md", "TEACHING.md"):
        text = (ROOT / doc).read_text(encoding="utf-8") if (ROOT / doc).exists() else ""
        for target in re.findall(re.escape(COLAB) + r"([^)\s\"']+)", text):
            assert (ROOT / target).is_file(), f"{doc} links Colab to {target}, which does not exist"


IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)


def core_requirements() -> set[str]:
    """Normalised names of the installed project's core dependencies (no extras)."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("lora-from-scratch") or []]
    return {
        canonicalize_name(r.name)
        for r in requirements
        if r.marker is None or r.marker.evaluate({"extra": ""})
    }


@every
def test_every_package_a_notebook_imports_is_a_core_dependency(path):
    """A learner's install (`python3 run.py lab`: the core dependencies alone) runs every cell;
    test-only packages are never needed by a notebook."""
    core = core_requirements()
    owners = importlib.metadata.packages_distributions()
    for cell in read(path).cells:
        if cell.cell_type != "code":
            continue
        for module in IMPORT.findall(cell.source):
            if module in sys.stdlib_module_names or module == "lora_helpers":
                continue
            dists = {canonicalize_name(d) for d in owners.get(module, [module])}
            assert dists & core, f"{rel(path)} imports {module!r}, not a core dependency ({dists})"


def test_the_readme_maps_every_notebook_and_every_module():
    """The README's map of notebooks and of modules names each one that exists, and no other."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"^\| \d\d \| \[[^]]+\]\((notebooks/\d\d_\w+\.ipynb)\)", text, re.M))
    assert linked == {p.relative_to(ROOT).as_posix() for p in NUMBERED}
    mapped = {
        name
        for first_column in re.findall(r"^\| (`\w+`(?:, `\w+`)*) \|", text, re.M)
        for name in re.findall(r"`(\w+)`", first_column)
    }
    modules = {p.stem for p in (ROOT / "lora_helpers").glob("*.py") if p.stem != "__init__"}
    assert mapped == modules, (
        f"modules missing from the README: {sorted(modules - mapped)}; "
        f"named there but absent: {sorted(mapped - modules)}"
    )
