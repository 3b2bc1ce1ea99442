"""SMS spam data: parsing, count checks, safe zip extraction, balance, split, padding, loaders."""

import hashlib
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_helpers import data
from lora_helpers.assets import AssetError

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """Stands in for tiktoken: one token per character."""

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data_dir, no shared assets, no network."""
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_ASSETS_PATH", "")
    monkeypatch.setenv("LORA_OFFLINE", "1")
    return tmp_path / "cache"


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_parse_handles_a_missing_final_newline_and_crlf():
    rows = data.parse_sms("ham\tHello there\r\nspam\tWIN now\tTODAY")
    assert rows == [("Hello there", 0), ("WIN now\tTODAY", 1)]


def test_parse_names_the_bad_line():
    with pytest.raises(ValueError, match="Line 2 is not"):
        data.parse_sms("ham\tok\nmaybe\tnot a label\n")


def test_wrong_counts_say_the_file_is_not_the_expected_version():
    rows = [("hi", 0)] * 4827 + [("win", 1)] * 746
    with pytest.raises(AssetError, match=r"5,573 rows \(4,827 ham, 746 spam\).*not the expected"):
        data.check_sms_counts(rows)
    data.check_sms_counts([("hi", 0)] * 4827 + [("win", 1)] * 747)  # the right counts pass


def test_the_real_collection_has_the_v1_counts(sms_rows):
    rows = sms_rows
    assert Counter(label for _, label in rows) == {0: 4827, 1: 747}
    splits = data.split(data.balance(rows))
    assert [len(s) for s in splits] == [1045, 149, 300]


def test_extract_member_copies_only_the_named_file(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"readme": b"about", "SMSSpamCollection": b"ham\thi\n"})
    dest = data.extract_member(archive, "SMSSpamCollection", tmp_path / "out" / "x", max_bytes=100)
    assert dest.read_bytes() == b"ham\thi\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]


@pytest.mark.parametrize("evil", ["../SMSSpamCollection", "/abs/SMSSpamCollection", "C:/x"])
def test_extract_member_refuses_path_traversal(tmp_path, evil):
    archive = _zip(tmp_path / "a.zip", {evil: b"ham\thi\n"})
    with pytest.raises(AssetError, match="unsafe member name"):
        data.extract_member(archive, "SMSSpamCollection", tmp_path / "out" / "x", max_bytes=100)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "SMSSpamCollection").exists()


def test_extract_member_refuses_an_oversized_member(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"SMSSpamCollection": b"x" * 1000})
    with pytest.raises(AssetError, match="over 100"):
        data.extract_member(archive, "SMSSpamCollection", tmp_path / "x", max_bytes=100)
    assert not (tmp_path / "x").exists()


def test_a_corrupt_zip_is_a_clear_error(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"SMSSpamCollection": b"ham\thello\n" * 50})
    raw = bytearray(archive.read_bytes())
    raw[40:60] = b"\xff" * 20  # damage the compressed data
    archive.write_bytes(bytes(raw))
    with pytest.raises(AssetError, match=r"not the expected zip archive.*delete"):
        data.extract_member(archive, "SMSSpamCollection", tmp_path / "x", max_bytes=10_000)
    (tmp_path / "junk.zip").write_bytes(b"this is not a zip file")
    with pytest.raises(AssetError, match="not the expected zip archive"):
        data.extract_member(
            tmp_path / "junk.zip", "SMSSpamCollection", tmp_path / "x", max_bytes=10
        )
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "x.part").exists()


def test_offline_without_a_copy_says_where_to_put_the_file(cache):
    with pytest.raises(AssetError, match=r"LORA_OFFLINE=1.*put SMSSpamCollection"):
        data.sms_spam_path()


def test_a_cached_zip_is_extracted_and_its_counts_checked(cache):
    (cache / data.SMS_ZIP_RELPATH).parent.mkdir(parents=True)
    _zip(cache / data.SMS_ZIP_RELPATH, {"SMSSpamCollection": b"ham\thello\nspam\tWIN"})
    path = data.sms_spam_path()
    assert path == cache / data.SMS_RELPATH
    assert path.read_text() == "ham\thello\nspam\tWIN"
    with pytest.raises(AssetError, match=r"2 rows.*not the expected version"):
        data.load_sms_spam()


def test_tiny_dataset_is_balanced_and_splits_70_10_20():
    rows = data.load_tiny_sms()
    assert Counter(label for _, label in rows) == {0: 50, 1: 50}
    splits = data.split(data.balance(rows))
    assert [len(s) for s in splits] == [70, 10, 20]
    assert sorted(r for s in splits for r in s) == sorted(rows)  # disjoint, nothing lost


def test_the_tiny_dataset_hash_matches_the_committed_file():
    # load_tiny_sms downloads the file with this hash where the checkout is absent (Colab):
    # update TINY_SHA256 whenever data/tiny/sms_tiny.tsv changes.
    committed = ROOT / "data" / data.TINY_RELPATH
    assert hashlib.sha256(committed.read_bytes()).hexdigest() == data.TINY_SHA256


def test_without_the_checkout_the_tiny_dataset_is_fetched(cache, monkeypatch):
    committed = (ROOT / "data" / data.TINY_RELPATH).read_bytes()
    monkeypatch.setattr(data, "checkout", lambda: None)
    with pytest.raises(AssetError, match="LORA_OFFLINE=1"):
        data.load_tiny_sms()
    (cache / "tiny").mkdir(parents=True)
    (cache / data.TINY_RELPATH).write_bytes(committed)
    assert len(data.load_tiny_sms()) == 100  # a verified copy in the cache is used


def test_balance_undersamples_to_the_rarest_label_reproducibly():
    rows = [(f"h{i}", 0) for i in range(30)] + [(f"s{i}", 1) for i in range(7)]
    balanced = data.balance(rows, seed=1)
    assert Counter(label for _, label in balanced) == {0: 7, 1: 7}
    assert balanced == data.balance(rows, seed=1) != data.balance(rows, seed=2)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"train \+ val < 1"):
        data.split([("a", 0)] * 10, (0.9, 0.2))


def test_padding_uses_endoftext_and_truncates():
    ids = data.encode(["abc", "a"], CharTokenizer())
    assert ids.tolist() == [[97, 98, 99], [97, data.PAD_ID, data.PAD_ID]]
    assert data.encode(["abcdef"], CharTokenizer(), max_length=2).tolist() == [[97, 98]]


def test_loaders_pad_every_split_to_the_longest_training_message():
    splits = data.Splits(
        [("aaaa", 0), ("bb", 1), ("c", 0)], [("dddddddd", 1)], [("e", 0), ("ff", 1)]
    )
    loaders = data.make_loaders(splits, CharTokenizer(), batch_size=2)
    assert loaders.max_length == 4
    ids, labels = next(iter(loaders.val))
    assert ids.tolist() == [[100] * 4]
    assert labels.tolist() == [1]
    assert len(loaders.train) == 1  # the last incomplete batch is dropped
    short = data.make_loaders(splits, CharTokenizer(), batch_size=2, max_length=3)
    assert short.max_length == 3


def test_tiny_dataset_with_the_gpt2_tokenizer(gpt2_tokenizer):
    splits = data.split(data.load_tiny_sms())
    loaders = data.make_loaders(splits, gpt2_tokenizer, batch_size=8)
    ids, labels = next(iter(loaders.train))
    assert ids.shape == (8, loaders.max_length)
    assert ids.dtype == torch.long
    assert set(labels.tolist()) <= {0, 1}
    assert (ids == data.PAD_ID).any()  # shorter messages are padded


def test_encode_refuses_a_single_string():
    with pytest.raises(TypeError, match=r"pass \[text\]"):
        data.encode("hello", CharTokenizer())


@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.1), 0.7, (0.7,), ("a", 0.1)])
def test_split_refuses_anything_but_two_fractions(fractions):
    with pytest.raises(ValueError, match=r"two numbers \(train, val\)"):
        data.split([("a", 0)] * 10, fractions)


@pytest.mark.parametrize("sizes", [(-5, 2, 2), (5, 2), (1.5, 2, 2), 3])
def test_subset_refuses_bad_sizes(sizes):
    splits = data.Splits([("a", 0)] * 70, [("b", 1)] * 10, [("c", 0)] * 20)
    with pytest.raises(ValueError, match="three non-negative ints"):
        data.subset(splits, sizes)
    assert [len(p) for p in data.subset(splits, [5, 2, 0])] == [5, 2, 0]


def test_subset_refuses_more_rows_than_a_split_has():
    splits = data.Splits([("a", 0)] * 70, [("b", 1)] * 10, [("c", 0)] * 20)
    with pytest.raises(ValueError, match="The val split has 10 rows, fewer than the 1,000"):
        data.subset(splits, (5, 1000, 0))
    assert [len(p) for p in data.subset(splits, (70, 10, 20))] == [70, 10, 20]


@pytest.mark.parametrize(
    "max_length",
    ["40", 2.5, 0, True, np.float64(4), np.int64(0), torch.tensor(4.0), torch.tensor(True)],
)
def test_encode_and_make_loaders_refuse_a_max_length_that_is_not_a_positive_int(max_length):
    splits = data.Splits([("ab", 0)] * 2, [("cd", 1)], [("ef", 0)])
    with pytest.raises(ValueError, match=r"max_length must be a positive integer.*or None"):
        data.encode(["hi"], CharTokenizer(), max_length)
    with pytest.raises(ValueError, match=r"max_length must be a positive integer.*or None"):
        data.make_loaders(splits, CharTokenizer(), max_length=max_length)


@pytest.mark.parametrize("max_length", [np.int64(3), np.int32(3), torch.tensor(3)])
def test_encode_and_make_loaders_take_any_integral_max_length(max_length):
    splits = data.Splits([("abcd", 0)] * 2, [("cd", 1)], [("ef", 0)])
    assert data.encode(["abcd"], CharTokenizer(), max_length).tolist() == [[97, 98, 99]]
    loaders = data.make_loaders(splits, CharTokenizer(), batch_size=2, max_length=max_length)
    assert loaders.max_length == 3
    assert type(loaders.max_length) is int


def test_a_file_that_is_not_utf8_names_itself_and_what_was_expected(tmp_path):
    path = tmp_path / "sms.zip"
    path.write_bytes(b"PK\x03\x04\xff\xfe not text")
    with pytest.raises(AssetError, match=r"sms\.zip is not UTF-8 text.*inside the SMS Spam"):
        data.load_sms_spam(path)
    with pytest.raises(AssetError, match=r"sms\.zip is not UTF-8 text.*label<TAB>message"):
        data.load_tiny_sms(path)


def test_balance_refuses_no_rows():
    with pytest.raises(ValueError, match="at least one row"):
        data.balance([])


def test_make_loaders_refuses_rows_instead_of_splits():
    with pytest.raises(TypeError, match=r"call make_loaders\(split\(rows\)"):
        data.make_loaders([("a", 0)] * 10, CharTokenizer())


def test_numpy_fractions_and_sizes_work_as_tuples_do():
    np = pytest.importorskip("numpy")
    rows = [(f"text {i}", i % 2) for i in range(20)]
    assert data.split(rows, np.array([0.7, 0.1])) == data.split(rows, (0.7, 0.1))
    parts = data.split(rows)
    assert data.subset(parts, tuple(np.array([2, 1, 1]))) == data.subset(parts, (2, 1, 1))
