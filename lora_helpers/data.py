"""The SMS Spam Collection (and a tiny offline stand-in) as padded token DataLoaders.

Pipeline: file -> rows (text, label) -> checked counts -> balanced -> split 70/10/20
-> token ids padded with <|endoftext|> -> DataLoaders. Labels: 0 = ham, 1 = spam.
"""

from __future__ import annotations

import numbers
import operator
import os
import random
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from .assets import AssetError, checkout, data_dir, fetch, find_asset
from .checks import positive_int

if TYPE_CHECKING:
    from tiktoken import Encoding

LABELS = ("ham", "spam")
SMS_RELPATH = "sms-spam-collection/SMSSpamCollection"
SMS_ZIP_RELPATH = "sms-spam-collection/sms+spam+collection.zip"
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
#: Rows per label in SMS Spam Collection v.1.
SMS_COUNTS = {"ham": 4827, "spam": 747}
SMS_MEMBER = "SMSSpamCollection"
MAX_MEMBER_BYTES = 5_000_000  # the real file is 0.48 MB
TINY_RELPATH = "tiny/sms_tiny.tsv"
TINY_URL = (
    "https://raw.githubusercontent.com/lora-from-scratch/lora-from-scratch/main/data/"
    + TINY_RELPATH
)
TINY_SHA256 = "f9c7cf05da40a4b3d22626ec40a6615f2fbc8817614e0579bf93e04677b4c752"
PAD_ID = 50256  # <|endoftext|> in GPT-2's tokenizer

Row = tuple[str, int]  # (message text, label id)


class Splits(NamedTuple):
    train: list[Row]
    val: list[Row]
    test: list[Row]


class Loaders(NamedTuple):
    train: DataLoader
    val: DataLoader
    test: DataLoader
    max_length: int


def parse_sms(text: str) -> list[Row]:
    """Rows of a `label<TAB>message` file; the last line may lack its newline."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, tab, message = line.partition("\t")
        if not tab or label not in LABELS:
            raise ValueError(
                f"Line {number} is not 'ham<TAB>text' or 'spam<TAB>text' (it starts with "
                f"{line[:30]!r}); the file is not in the SMS Spam Collection format."
            )
        rows.append((message, LABELS.index(label)))
    return rows


def check_sms_counts(rows: list[Row], path: Path | str = SMS_RELPATH) -> None:
    """Raise AssetError unless `rows` has the 5,574 rows (4,827 ham, 747 spam) of v.1."""
    counts = Counter(LABELS[label] for _, label in rows)
    if dict(counts) != SMS_COUNTS:
        raise AssetError(
            f"{path} has {len(rows):,} rows ({counts['ham']:,} ham, {counts['spam']:,} spam), "
            f"not the 5,574 (4,827 ham, 747 spam) of SMS Spam Collection v.1, so it is not the "
            f"expected version; delete it (or drop its folder from LORA_ASSETS_PATH) and run "
            f"again to download v.1 from {SMS_URL}."
        )


def _is_unsafe(name: str) -> bool:
    """A member name that could escape the target folder: absolute, drive letter, or '..'."""
    return name.startswith(("/", "\\")) or ":" in name or ".." in name.replace("\\", "/").split("/")


def _find_member(archive: zipfile.ZipFile, member: str, max_bytes: int) -> zipfile.ZipInfo:
    names = archive.namelist()
    unsafe = [n for n in names if _is_unsafe(n)]
    if unsafe:
        raise AssetError(f"it holds an unsafe member name ({unsafe[0]!r})")
    found = [i for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == member]
    if not found:
        raise AssetError(f"it has no {member!r} (it holds {names[:5]})")
    if found[0].file_size > max_bytes:
        raise AssetError(f"its {member!r} has {found[0].file_size:,} bytes, over {max_bytes:,}")
    return found[0]


def extract_member(zip_path: Path, member: str, dest: Path, *, max_bytes: int) -> Path:
    """Copy the file named `member` out of a zip archive to `dest`, atomically and safely.

    Refuses archives with absolute or '..' member names and members over `max_bytes`
    (counted while reading, not trusted from the header); only `dest` is ever written.
    """
    part = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            info = _find_member(archive, member, max_bytes)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(part, "wb") as out:
                written = 0
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > max_bytes:
                        raise AssetError(f"its {member!r} has more than {max_bytes:,} bytes")
                    out.write(chunk)
    except (AssetError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        part.unlink(missing_ok=True)
        raise AssetError(
            f"{zip_path.name} is not the expected zip archive ({error}); delete {zip_path} "
            "and run again to download it afresh."
        ) from None
    os.replace(part, dest)
    return dest


def _check_zip(path: Path) -> None:
    """Raise ValueError unless `path` is a readable zip holding SMSSpamCollection."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name.rsplit("/", 1)[-1] for name in archive.namelist()]
            bad = archive.testzip()
    except zipfile.BadZipFile as error:
        raise ValueError(f"it is not a valid zip file ({error})") from None
    if SMS_MEMBER not in names or bad is not None:
        raise ValueError(f"it is not the SMS Spam Collection zip (holds {names[:5]})")


def sms_spam_path() -> Path:
    """Path of the SMSSpamCollection file: found locally, or downloaded and extracted once."""
    found = find_asset(SMS_RELPATH)
    if found is not None:
        return found
    dest = data_dir() / SMS_RELPATH
    try:
        archive = fetch(SMS_ZIP_RELPATH, SMS_URL, desc="SMS Spam Collection", check=_check_zip)
    except AssetError as error:
        raise AssetError(
            f"{str(error).rstrip('.')}; or put SMSSpamCollection (the file inside that zip) "
            f"at {dest}."
        ) from None
    return extract_member(archive, SMS_MEMBER, dest, max_bytes=MAX_MEMBER_BYTES)


def load_sms_spam(path: str | Path | None = None) -> list[Row]:
    """All 5,574 rows of the SMS Spam Collection, checked; downloads it if needed.

    Raises AssetError when the file is not UTF-8 text or has other counts than v.1,
    ValueError when a line is not `label<TAB>message`.
    """
    path = sms_spam_path() if path is None else Path(path)
    text = _read_utf8(
        path,
        ", so it is not SMSSpamCollection, the text file inside the SMS Spam Collection zip; "
        f"pass that file, or delete this one and run again to download v.1 from {SMS_URL}.",
    )
    rows = parse_sms(text)
    check_sms_counts(rows, path)
    return rows


def _read_utf8(path: Path, why_and_fix: str) -> str:
    """The text of `path`; AssetError naming the file (then `why_and_fix`) if not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise AssetError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start:,}){why_and_fix}"
        ) from None


def load_tiny_sms(path: str | Path | None = None) -> list[Row]:
    """The 100 invented messages (50 ham, 50 spam) of data/tiny/, for quick offline runs.

    Read from the repository checkout; where the package is installed without it (Colab),
    fetched once from the repository on GitHub (sha256-checked). Raises AssetError when
    the file is not UTF-8 text.
    """
    if path is None:
        root = checkout()
        path = root / "data" / TINY_RELPATH if root else None
        if path is None or not path.is_file():
            path = fetch(TINY_RELPATH, TINY_URL, sha256=TINY_SHA256, desc="tiny SMS dataset")
    fix = f"; pass a file of `label<TAB>message` lines, or restore {TINY_RELPATH} from the repository."
    return parse_sms(_read_utf8(Path(path), fix))


def balance(rows: list[Row], seed: int = 123) -> list[Row]:
    """Undersample every label to the rarest label's count (seeded); order: by label.

    Raises ValueError for no rows.
    """
    if not rows:
        raise ValueError("balance needs at least one row, got none; check the loaded data.")
    by_label: dict[int, list[Row]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    smallest = min(len(group) for group in by_label.values())
    rng = random.Random(seed)
    return [row for _, group in sorted(by_label.items()) for row in rng.sample(group, smallest)]


def split(rows: list[Row], fractions: tuple[float, float] = (0.7, 0.1), seed: int = 123) -> Splits:
    """Shuffle (seeded) and cut into train / val / test; test gets what is left (20 %).

    Raises ValueError unless `fractions` is two numbers (train, val), train > 0, train + val < 1.
    """
    if not (
        not isinstance(fractions, str)
        and hasattr(fractions, "__len__")
        and len(fractions) == 2
        and all(isinstance(f, numbers.Real) and not isinstance(f, bool) for f in fractions)
    ):
        raise ValueError(
            f"fractions must be two numbers (train, val), got {fractions!r}; test gets the "
            "rest, e.g. (0.7, 0.1)."
        )
    if not (0 < fractions[0] and 0 <= fractions[1] and sum(fractions) < 1):
        raise ValueError(
            f"fractions {fractions} must be (train, val) with train > 0 and train + val < 1."
        )
    shuffled = rows.copy()
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(rows) * fractions[0])
    n_val = int(len(rows) * fractions[1])
    return Splits(
        shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]
    )


def subset(splits: Splits, sizes: tuple[int, int, int]) -> Splits:
    """The first `sizes` rows of train, val and test (the splits are already shuffled).

    Raises ValueError unless `sizes` is three non-negative ints (train, val, test), each at
    most its split's size.
    """
    if not (
        not isinstance(sizes, str)
        and hasattr(sizes, "__len__")
        and len(sizes) == 3
        and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in sizes
        )
    ):
        raise ValueError(
            f"sizes must be three non-negative ints (train, val, test), got {sizes!r}; "
            "e.g. (320, 149, 300)."
        )
    for name, part, n in zip(Splits._fields, splits, sizes, strict=True):
        if n > len(part):
            raise ValueError(
                f"The {name} split has {len(part):,} rows, fewer than the {int(n):,} asked for; "
                f"ask for at most {len(part):,} (sizes {tuple(int(k) for k in sizes)})."
            )
    return Splits(*(part[: int(n)] for part, n in zip(splits, sizes, strict=True)))


def _max_length(value: object, hint: str) -> int:
    """`value` as an int >= 1: any integral number (numpy ints, 0-d integer tensors) is
    converted; a bool, float, str or value < 1 raises positive_int's ValueError."""
    if not isinstance(value, bool) and not (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool
    ):
        try:
            value = operator.index(value)
        except TypeError:
            pass
    return positive_int("max_length", value, hint)


def encode(texts: list[str], tokenizer: Encoding, max_length: int | None = None) -> torch.Tensor:
    """Token ids (n, max_length), padded with <|endoftext|> (50256) and truncated.

    max_length=None pads to the longest text. Raises TypeError for a single str (pass a
    list), ValueError for no texts, only empty texts, or a max_length that is not a positive
    integer (numpy ints and 0-d integer tensors are fine).
    """
    if max_length is not None:
        max_length = _max_length(max_length, "pass an int, or None to pad to the longest text")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got one str; pass [text] instead.")
    if not texts:
        raise ValueError("encode needs at least one text; the split is empty.")
    ids = [tokenizer.encode_ordinary(t) for t in texts]
    length = max(len(i) for i in ids) if max_length is None else max_length
    if length < 1:
        raise ValueError("Every text is empty (0 tokens); give at least one non-empty text.")
    out = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
    for row, tokens in enumerate(ids):
        tokens = tokens[:length]
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


class SpamDataset(Dataset):
    """Padded token ids (n, max_length) and labels (n,) of a list of rows."""

    def __init__(self, rows: list[Row], tokenizer: Encoding, max_length: int | None = None) -> None:
        if not rows:
            raise ValueError("SpamDataset needs at least one row; the split is empty.")
        self.input_ids = encode([text for text, _ in rows], tokenizer, max_length)
        self.labels = torch.tensor([label for _, label in rows], dtype=torch.long)

    @property
    def max_length(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.labels[index]


def make_loaders(
    splits: Splits,
    tokenizer: Encoding,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 123,
) -> Loaders:
    """DataLoaders of (ids (batch, max_length), labels (batch,)); train is shuffled (seeded).

    Every split is padded to the longest training message, cut at `max_length` if given.
    Raises TypeError unless `splits` is a Splits, ValueError for an empty split or a
    batch_size or max_length that is not a positive int.
    """
    if not isinstance(splits, Splits):
        raise TypeError(
            f"splits must be the Splits (train, val, test) that split() returns, got a "
            f"{type(splits).__name__}; call make_loaders(split(rows), tokenizer)."
        )
    positive_int("batch_size", batch_size)
    if max_length is not None:
        max_length = _max_length(
            max_length, "pass an int, or None to pad to the longest training text"
        )
    if not all(splits):
        raise ValueError(
            f"A split is empty (sizes {[len(part) for part in splits]}); give each split rows."
        )
    longest = max(len(tokenizer.encode_ordinary(text)) for text, _ in splits.train)
    max_length = longest if max_length is None else min(max_length, longest)
    train, val, test = (SpamDataset(part, tokenizer, max_length) for part in splits)
    generator = torch.Generator().manual_seed(seed)
    return Loaders(
        DataLoader(
            train,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(train) >= batch_size,
            generator=generator,
        ),
        DataLoader(val, batch_size=batch_size),
        DataLoader(test, batch_size=batch_size),
        max_length,
    )
