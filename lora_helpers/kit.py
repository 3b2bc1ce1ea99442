"""Offline classroom kit: every file the series downloads, gathered in one folder.

    python -m lora_helpers.kit download DIR [--gpt2 gpt2-small gpt2-medium ...]
    python -m lora_helpers.kit check DIR [--gpt2 ...]

`download` takes each file from a local copy (the folders on LORA_ASSETS_PATH, the
cache) or else from the internet, through lora_helpers.assets, and copies it into DIR in
the layout the series reads (gpt2-tokenizer/, sms-spam-collection/,
gpt2/<size>/model.safetensors). `check` verifies DIR alone, offline, with the same
checks the notebooks use (sha256, row counts, the tokenizer encoding a sentence).

Point the notebooks at a kit (a USB stick, a shared drive) with LORA_ASSETS_PATH=DIR;
add LORA_OFFLINE=1 to be sure that nothing is downloaded.

notebooks/00_setup_check.ipynb uses missing_requirements() and locate() to say whether a
machine is ready for class.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import Requirement

from . import assets, data, gpt2
from .assets import AssetError, checkout

DEFAULT_GPT2 = ("gpt2-small",)
TOKENIZER_DIR = "gpt2-tokenizer"
DISTRIBUTION = "lora-from-scratch"


class KitItem(NamedTuple):
    """One asset of a kit: its name, where it lives in the kit, "ok"/"missing"/"bad", why."""

    name: str
    relpath: str
    status: str
    detail: str


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables inside the block, restoring the old values after."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _copy_into(kit: Path, relpath: str, found: Path) -> None:
    """Copy a verified file into the kit at `relpath` (atomically), unless it is already there."""
    dest = kit / relpath
    if dest.exists() and dest.samefile(found):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(found, part)
    os.replace(part, dest)


def download(kit: str | os.PathLike, gpt2_sizes: tuple[str, ...] = DEFAULT_GPT2) -> list[KitItem]:
    """Fill folder `kit` with the tokenizer, the SMS data and GPT-2 `gpt2_sizes`; then check it.

    Local copies (LORA_ASSETS_PATH, the cache) are used first; the rest is downloaded.
    Returns check(kit, gpt2_sizes); raises AssetError when something cannot be had (then
    the folders it created are removed again if nothing came into them) or `kit` is a file.
    """
    kit = Path(kit).expanduser().resolve()
    for size in gpt2_sizes:
        gpt2.gpt2_config(size)  # an unknown size fails here, before any download
    if kit.exists() and not kit.is_dir():
        raise AssetError(f"{kit} is a file, not a folder; give download a folder for the kit.")
    made = [p for p in (kit, *kit.parents) if not p.exists()]  # created here, deepest first
    kit.mkdir(parents=True, exist_ok=True)
    sources = [p for p in [*assets.asset_search_path(), assets.data_dir()] if p.resolve() != kit]
    try:
        with _environ(LORA_DATA_DIR=str(kit), LORA_ASSETS_PATH=os.pathsep.join(map(str, sources))):
            for relpath, (url, sha256) in gpt2.TOKENIZER_FILES.items():
                found = assets.fetch(relpath, url, sha256=sha256, desc="GPT-2 tokenizer")
                _copy_into(kit, relpath, found)
            _copy_into(kit, data.SMS_RELPATH, data.sms_spam_path())
            for size in gpt2_sizes:
                _copy_into(kit, gpt2.weights_relpath(size), gpt2.download_gpt2_weights(size))
    except BaseException:
        if made and not any(p.is_file() for p in made[-1].rglob("*")):  # nothing came
            shutil.rmtree(made[-1])  # only folders this call created, all of them empty
        raise
    return check(kit, gpt2_sizes)


def _tokenizer_works() -> None:
    if gpt2.get_tokenizer().encode("Hello, world") != [15496, 11, 995]:
        raise ValueError("the tokenizer built from these files encodes text wrongly")


def _verify(kit: Path, name: str, relpath: str, load: Callable[[], object]) -> KitItem:
    """Run the series' own loader `load` against the kit alone; report what happened."""
    if not (kit / relpath).exists():
        return KitItem(name, relpath, "missing", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load()
        except (AssetError, ValueError, OSError) as err:
            reasons = [str(w.message) for w in caught] or [str(err)]
            return KitItem(name, relpath, "bad", " ".join(reasons))
    return KitItem(name, relpath, "ok", "")


def check(kit: str | os.PathLike, gpt2_sizes: tuple[str, ...] = DEFAULT_GPT2) -> list[KitItem]:
    """Verify folder `kit` offline: tokenizer, SMS data, GPT-2 `gpt2_sizes` and any other size in it.

    Raises AssetError when `kit` is a file, ValueError for an unknown GPT-2 size.
    """
    kit = Path(kit).expanduser().resolve()
    if kit.exists() and not kit.is_dir():
        raise AssetError(f"{kit} is a file, not a folder; give check the kit's folder.")
    present = sorted(p.parent.name for p in kit.glob("gpt2/*/model.safetensors"))
    sizes = list(dict.fromkeys([*gpt2_sizes, *present]))
    for size in sizes:
        gpt2.gpt2_config(size)
    with (
        tempfile.TemporaryDirectory(prefix="lora-kit-check-") as empty,
        _environ(
            LORA_ASSETS_PATH=str(kit),
            LORA_DATA_DIR=empty,
            LORA_OFFLINE="1",
            TIKTOKEN_CACHE_DIR=empty,
        ),
    ):
        items = [
            _verify(kit, "GPT-2 tokenizer", TOKENIZER_DIR, _tokenizer_works),
            _verify(kit, "SMS Spam Collection", data.SMS_RELPATH, data.load_sms_spam),
        ]
        for size in sizes:
            relpath = gpt2.weights_relpath(size)
            load = functools.partial(gpt2.download_gpt2_weights, size)
            items.append(_verify(kit, f"GPT-2 weights {size}", relpath, load))
    return items


def missing_requirements(distribution: str = DISTRIBUTION) -> list[str]:
    """The series' required packages that are absent or too old here, e.g. ["torch>=2.2 (2.1.0)"]."""
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return [f"{distribution} (not installed: run `pip install -e .` in the repository)"]
    problems = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra, such as the test tools
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req} ({installed} installed)")
    return problems


def display_path(path: Path) -> str:
    """A path for printing: relative to the repository (or its folder), or with ~ for home."""
    path, repo = Path(path).resolve(), checkout()
    if repo and path.is_relative_to(repo):
        return path.relative_to(repo).as_posix() or "."
    if path.is_relative_to(Path.home()):
        return "~/" + path.relative_to(Path.home()).as_posix()
    if repo and path.is_relative_to(repo.parent):
        return "../" + path.relative_to(repo.parent).as_posix()
    return str(path)


def locate(gpt2_sizes: tuple[str, ...] = DEFAULT_GPT2) -> list[tuple[str, Path | None]]:
    """Where the notebooks would find each asset now (LORA_ASSETS_PATH, then the cache), or None.

    Looks only; neither downloads nor verifies (the notebooks verify when they load).
    """
    relpaths = {"GPT-2 tokenizer": f"{TOKENIZER_DIR}/encoder.json"}
    relpaths["SMS Spam Collection"] = data.SMS_RELPATH
    for size in gpt2_sizes:
        relpaths[f"GPT-2 weights {size}"] = gpt2.weights_relpath(size)
    return [(name, assets.find_asset(relpath)) for name, relpath in relpaths.items()]


def _size(path: Path) -> str:
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        total = path.stat().st_size
    else:
        return ""
    return f"{total / 1e6:,.1f} MB"


def report(kit: Path, items: list[KitItem]) -> str:
    """The check's result as a table, one asset a line, then how to use the kit."""
    lines = [f"Kit {kit}:"]
    for item in items:
        lines.append(
            f"  {item.status:8} {item.name:26} {item.relpath:38} {_size(kit / item.relpath)}"
        )
        if item.detail:
            lines.append(f"           {item.detail}")
    if all(item.status == "ok" for item in items):
        lines.append(
            f"Use it: set LORA_ASSETS_PATH={kit} (and LORA_OFFLINE=1 to forbid downloads) "
            "before starting Jupyter."
        )
    else:
        sizes = " ".join(i.name.split()[-1] for i in items if i.name.startswith("GPT-2 weights"))
        lines.append(
            "Fix it: on a machine with internet, run "
            f"python -m lora_helpers.kit download {kit} --gpt2 {sizes}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_helpers.kit",
        description="Gather every file the series downloads into one folder, or check one.",
    )
    parser.add_argument("command", choices=["download", "check"])
    parser.add_argument("dir", type=Path, help="the kit's folder")
    parser.add_argument(
        "--gpt2",
        nargs="*",
        default=list(DEFAULT_GPT2),
        metavar="SIZE",
        help="GPT-2 sizes to include: gpt2-small (default), gpt2-medium, gpt2-large, gpt2-xl; "
        "none with an empty --gpt2",
    )
    args = parser.parse_args(argv)
    kit = args.dir.expanduser().resolve()
    try:
        run = download if args.command == "download" else check
        items = run(kit, tuple(args.gpt2))
    except (AssetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(kit, items))
    return 0 if all(item.status == "ok" for item in items) else 1


if __name__ == "__main__":
    sys.exit(main())
