"""The one place that downloads: find a file locally, else fetch it, verified and atomically.

Files are named by a relative path ("gpt2-tokenizer/encoder.json") and looked for in

1. the read-only folders of LORA_ASSETS_PATH (a classroom USB stick, a shared drive),
2. the writable cache data_dir() (LORA_DATA_DIR, the repository's data/ folder, or
   ~/.cache/lora-from-scratch),

and only then downloaded into the cache: first to "<file>.part" (resumed with an HTTP
Range request after an interruption), then checked (size, sha256, optional content
check) and renamed into place, so a corrupt file never sits under the final name.
LORA_OFFLINE=1 forbids the network altogether.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path

from tqdm.auto import tqdm

_CHUNK = 1 << 20  # bytes per read
_TIMEOUT_S = 30
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


class AssetError(RuntimeError):
    """A file could not be found or fetched; the message says what to do."""


def checkout() -> Path | None:
    """The series' repository checkout in use, or None (Colab, a script outside a checkout).

    The folder above this package when it is a checkout (pip install -e .), else the working
    directory or the nearest of its parents that is one (pip install ., notebooks run from
    a checkout). A checkout holds data/README.md, notebooks/ and lora_helpers/.
    """
    cwd = Path.cwd().resolve()
    for root in (Path(__file__).resolve().parents[1], cwd, *cwd.parents):
        if all((root / p).exists() for p in ("data/README.md", "notebooks", "lora_helpers")):
            return root
    return None


def data_dir() -> Path:
    """The writable cache: $LORA_DATA_DIR, else the checkout's data/, else ~/.cache/lora-from-scratch."""
    if os.environ.get("LORA_DATA_DIR"):
        return Path(os.environ["LORA_DATA_DIR"]).expanduser()
    root = checkout()
    return root / "data" if root else Path.home() / ".cache" / "lora-from-scratch"


def asset_search_path() -> list[Path]:
    """Read-only folders from $LORA_ASSETS_PATH (os.pathsep-separated), searched before data_dir()."""
    entries = os.environ.get("LORA_ASSETS_PATH", "").split(os.pathsep)
    return [Path(entry).expanduser() for entry in entries if entry.strip()]


def find_asset(relpath: str) -> Path | None:
    """The first existing copy of `relpath` in asset_search_path(), then data_dir(); else None."""
    for folder in [*asset_search_path(), data_dir()]:
        if (folder / relpath).is_file():
            return folder / relpath
    return None


def writable_folder(folder: str | Path, name: str = "folder") -> Path:
    """`folder` as a Path, once it is clear that it can be created or written to: it is a
    folder, or does not exist yet under a folder this process may write in. Changes nothing
    on disk. Raises ValueError naming the problem, TypeError for something that is not a path.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a folder; pass a folder.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} {str(path)!r} cannot be written: {str(existing)!r} is "
            f"{'not a folder' if not existing.is_dir() else 'not writable'}; pass a folder you "
            "can write to."
        )
    return path


def write_atomically(path: Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` whole or not at all; returns `path`.

    It goes to a temporary file of this process's own beside `path` (so two processes writing
    the same file do not mix), which is then renamed over `path`; the file gets the user's
    usual permissions (umask). Raises OSError as writing does, leaving no temporary file.
    """
    part = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        if isinstance(data, str):
            part.write_text(data, encoding="utf-8")
        else:
            part.write_bytes(data)
        os.replace(part, path)
    finally:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)  # gone after the rename; left by a failed write
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks; remembered per (path, size, mtime) for this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def _problem(
    path: Path, sha256: str | None, size: int | None, check: Callable[[Path], None] | None
) -> str | None:
    """Why `path` is not the expected file, or None when it is."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"it has {actual_size:,} bytes, not {size:,}"
    if sha256 is not None and sha256_of(path) != sha256.lower():
        return f"its sha256 is {sha256_of(path)}, not {sha256.lower()}"
    if check is not None:
        try:
            check(path)
        except (ValueError, OSError) as err:
            return str(err)
    return None


def _advice(relpath: str, dest: Path) -> str:
    return (
        f"download it on a machine with internet and put it at {dest}, "
        f"or point LORA_ASSETS_PATH at a folder holding {relpath}"
    )


def fetch(
    relpath: str,
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    desc: str | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Path to a verified local copy of `relpath`, downloading it from `url` if needed.

    sha256, size: the expected file (checked on local copies and downloads alike).
    check: an extra content check, called with the file's path; raises ValueError if wrong.
    Raises AssetError, with what to do, when no good copy exists and it cannot be downloaded.
    """
    dest = data_dir() / relpath
    for folder in [*asset_search_path(), data_dir()]:
        candidate = folder / relpath
        if not candidate.is_file():
            continue
        problem = _problem(candidate, sha256, size, check)
        if problem is None:
            return candidate
        warnings.warn(f"Ignoring {candidate}: {problem}.", stacklevel=2)

    if os.environ.get("LORA_OFFLINE") == "1":
        raise AssetError(
            f"Could not download {relpath} from {url} (LORA_OFFLINE=1 is set); "
            f"{_advice(relpath, dest)}, or unset LORA_OFFLINE."
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AssetError(
            f"Could not create the folder for {relpath} in {dest.parent} ({err.strerror or err}); "
            "set LORA_DATA_DIR to a writable folder."
        ) from err

    part = dest.with_name(dest.name + ".part")
    resumed = _download(url, part, relpath, dest, size, desc)
    problem = _problem(part, sha256, size, check)
    if problem is not None and resumed:  # the old partial may have been the bad part: start over
        part.unlink()
        _download(url, part, relpath, dest, size, desc)
        problem = _problem(part, sha256, size, check)
    if problem is not None:
        part.unlink()
        raise AssetError(
            f"The file downloaded from {url} is not the expected {relpath} ({problem}), so it was "
            f"deleted; try again later, or {_advice(relpath, dest)}."
        )
    os.replace(part, dest)
    return dest


def _download(
    url: str, part: Path, relpath: str, dest: Path, size: int | None, desc: str | None
) -> bool:
    """Fill `part` from `url`, continuing an existing partial file; True if it resumed one."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:  # complete (verify it) or too long (start over)
        if offset == size:
            return True
        part.unlink()
        offset = 0
    request = urllib.request.Request(url, headers={"User-Agent": "lora-from-scratch"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the server cannot continue this partial file
            part.unlink()
            return _download(url, part, relpath, dest, size, desc)
        raise AssetError(
            f"Could not download {relpath} from {url} (HTTP {err.code} {err.reason}); check the "
            f"address or try again later, or {_advice(relpath, dest)}."
        ) from err
    except (urllib.error.URLError, OSError, HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise AssetError(
            f"Could not download {relpath} from {url} ({reason}); you seem to be offline: "
            f"{_advice(relpath, dest)}."
        ) from err

    with response:
        resumed = offset > 0 and response.status == 206
        if resumed and _range_start(response) != offset:  # a range we did not ask for
            response.close()
            part.unlink()
            return _download(url, part, relpath, dest, size, desc)
        if not resumed:
            offset = 0  # no partial, or the server ignored the Range header: start from zero
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        try:
            out = open(part, "ab" if resumed else "wb")
        except OSError as err:
            raise _disk_error(relpath, part, err) from err
        received = offset
        with (
            out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc or relpath,
            ) as bar,
        ):
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, HTTPException) as err:
                    raise _interrupted(relpath, url, received, total, err) from err
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as err:
                    raise _disk_error(relpath, part, err) from err
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise _interrupted(relpath, url, received, total, "the connection closed early")
    return resumed


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _interrupted(relpath: str, url: str, received: int, total: int | None, reason) -> AssetError:
    of_total = f" of {total:,}" if total is not None else ""
    return AssetError(
        f"The download of {relpath} from {url} stopped after {received:,}{of_total} bytes "
        f"({reason}); run the same command again to resume it."
    )


def _disk_error(relpath: str, path: Path, err: OSError) -> AssetError:
    return AssetError(
        f"Could not write {relpath} to {path} ({err.strerror or err}); free some disk space "
        "or set LORA_DATA_DIR to a folder with room."
    )
