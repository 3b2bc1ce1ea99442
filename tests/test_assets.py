"""lora_helpers.assets against a file server on 127.0.0.1: never the internet."""

import hashlib
import os
from pathlib import Path

import pytest
from _http_server import FileServer, closed_port_url

from lora_helpers import assets
from lora_helpers.assets import AssetError, asset_search_path, data_dir, fetch, find_asset

ROOT = Path(__file__).resolve().parents[1]

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes: several read chunks
SHA = hashlib.sha256(DATA).hexdigest()
REL = "things/blob.bin"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh cache, no search path, network allowed (to loopback only: every URL here is local)."""
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORA_ASSETS_PATH", raising=False)
    monkeypatch.delenv("LORA_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def server():
    with FileServer({"/blob.bin": DATA, "/bad.bin": DATA[:-1] + b"!"}) as srv:
        yield srv


def test_data_dir_is_lora_data_dir_when_set(isolated):
    assert data_dir() == isolated


def test_data_dir_is_the_checkouts_data_folder_else_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_DATA_DIR")
    assert data_dir() == ROOT / "data"  # this checkout has data/README.md
    monkeypatch.setattr(assets, "checkout", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "lora-from-scratch"


def test_search_path_splits_on_pathsep_and_skips_empty_entries(monkeypatch, tmp_path):
    monkeypatch.setenv(
        "LORA_ASSETS_PATH", os.pathsep.join(["", str(tmp_path / "a"), str(tmp_path / "b"), ""])
    )
    assert asset_search_path() == [tmp_path / "a", tmp_path / "b"]


def test_find_asset_prefers_the_search_path_to_the_cache(monkeypatch, tmp_path, isolated):
    for folder in (tmp_path / "stick", isolated):
        (folder / REL).parent.mkdir(parents=True)
        (folder / REL).write_bytes(DATA)
    assert find_asset(REL) == isolated / REL
    monkeypatch.setenv("LORA_ASSETS_PATH", str(tmp_path / "stick"))
    assert find_asset(REL) == tmp_path / "stick" / REL
    assert find_asset("things/missing.bin") is None


def test_fetch_downloads_verifies_and_then_uses_the_cache(server, isolated):
    path = fetch(REL, server.url("/blob.bin"), sha256=SHA, size=len(DATA))
    assert path == isolated / REL
    assert path.read_bytes() == DATA
    assert not (isolated / "things" / "blob.bin.part").exists()
    assert fetch(REL, server.url("/blob.bin"), sha256=SHA) == path
    assert len(server.requests) == 1  # the second call found the verified copy


def test_fetch_uses_a_good_copy_on_the_search_path_without_the_network(
    monkeypatch, tmp_path, isolated
):
    (tmp_path / "stick" / REL).parent.mkdir(parents=True)
    (tmp_path / "stick" / REL).write_bytes(DATA)
    monkeypatch.setenv("LORA_ASSETS_PATH", str(tmp_path / "stick"))
    monkeypatch.setenv("LORA_OFFLINE", "1")
    assert fetch(REL, closed_port_url(), sha256=SHA) == tmp_path / "stick" / REL
    assert not isolated.exists()


def test_a_bad_copy_on_the_search_path_is_skipped_with_a_warning(
    server, monkeypatch, tmp_path, isolated
):
    (tmp_path / "stick" / REL).parent.mkdir(parents=True)
    (tmp_path / "stick" / REL).write_bytes(b"not it")
    monkeypatch.setenv("LORA_ASSETS_PATH", str(tmp_path / "stick"))
    with pytest.warns(UserWarning, match="sha256"):
        path = fetch(REL, server.url("/blob.bin"), sha256=SHA)
    assert path == isolated / REL
    assert (tmp_path / "stick" / REL).read_bytes() == b"not it"  # read-only folders stay untouched


def test_a_corrupt_cached_file_is_replaced_by_a_fresh_download(server, isolated):
    (isolated / REL).parent.mkdir(parents=True)
    (isolated / REL).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="bytes"):
        path = fetch(REL, server.url("/blob.bin"), size=len(DATA))
    assert path.read_bytes() == DATA


def test_checksum_mismatch_is_an_error_and_leaves_no_file(server, isolated):
    with pytest.raises(
        AssetError, match=r"not the expected things/blob.bin \(its sha256 is"
    ) as err:
        fetch(REL, server.url("/bad.bin"), sha256=SHA)
    assert "LORA_ASSETS_PATH" in str(err.value)
    assert not (isolated / REL).exists()
    assert not (isolated / "things" / "blob.bin.part").exists()


def test_size_mismatch_is_an_error(server, isolated):
    with pytest.raises(AssetError, match="bytes, not"):
        fetch(REL, server.url("/blob.bin"), size=len(DATA) + 1)
    assert not (isolated / REL).exists()


def test_a_failing_content_check_is_an_error(server, isolated):
    def check(path):
        raise ValueError("no header")

    with pytest.raises(AssetError, match="no header"):
        fetch(REL, server.url("/blob.bin"), check=check)
    assert list((isolated / "things").iterdir()) == []


def test_an_interrupted_download_keeps_the_partial_file_and_resumes_with_range(server, isolated):
    part = isolated / "things" / "blob.bin.part"
    server.drop_after = 300_000
    with pytest.raises(AssetError, match=r"stopped after 300,000 of 1,024,000 bytes.*run the same"):
        fetch(REL, server.url("/blob.bin"), sha256=SHA, size=len(DATA))
    assert part.stat().st_size == 300_000
    assert not (isolated / REL).exists()

    server.drop_after = None
    path = fetch(REL, server.url("/blob.bin"), sha256=SHA, size=len(DATA))
    assert path.read_bytes() == DATA
    assert server.requests[-1] == ("/blob.bin", "bytes=300000-")
    assert not part.exists()


def test_a_server_without_range_support_restarts_from_zero(server, isolated):
    part = isolated / "things" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:1000])
    server.ranges = False
    path = fetch(REL, server.url("/blob.bin"), sha256=SHA)
    assert server.requests == [("/blob.bin", "bytes=1000-")]  # asked, got the whole file (200)
    assert path.read_bytes() == DATA


def test_a_bad_partial_file_is_thrown_away_and_the_download_restarts(server, isolated):
    part = isolated / "things" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # wrong bytes: resuming it cannot verify
    path = fetch(REL, server.url("/blob.bin"), sha256=SHA)
    assert server.requests == [("/blob.bin", "bytes=1000-"), ("/blob.bin", None)]
    assert path.read_bytes() == DATA


def test_a_partial_file_longer_than_the_expected_size_restarts(server, isolated):
    part = isolated / "things" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA + b"extra")
    path = fetch(REL, server.url("/blob.bin"), sha256=SHA, size=len(DATA))
    assert server.requests == [("/blob.bin", None)]
    assert path.read_bytes() == DATA


def test_a_partial_file_the_server_cannot_continue_restarts(server, isolated):
    part = isolated / "things" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA + b"extra")  # no expected size given: only the server can tell
    path = fetch(REL, server.url("/blob.bin"), sha256=SHA)
    assert server.requests == [("/blob.bin", f"bytes={len(DATA) + 5}-"), ("/blob.bin", None)]
    assert path.read_bytes() == DATA


def test_refused_connection_is_one_sentence_saying_offline_and_what_to_do(isolated):
    with pytest.raises(AssetError) as err:
        fetch(REL, closed_port_url(), sha256=SHA)
    message = str(err.value)
    assert "Could not download things/blob.bin from http://127.0.0.1:" in message
    assert "you seem to be offline" in message
    assert str(isolated / REL) in message
    assert "point LORA_ASSETS_PATH at a folder holding things/blob.bin" in message
    assert message.count(". ") == 0  # one sentence
    assert message.endswith(".")


def test_lora_offline_never_touches_the_network(server, monkeypatch, isolated):
    monkeypatch.setenv("LORA_OFFLINE", "1")
    with pytest.raises(AssetError, match=r"LORA_OFFLINE=1 is set.*LORA_ASSETS_PATH"):
        fetch(REL, server.url("/blob.bin"))
    assert server.requests == []


def test_http_error_names_the_status(server):
    with pytest.raises(AssetError, match="HTTP 404"):
        fetch(REL, server.url("/missing.bin"))


def test_an_unwritable_cache_is_a_clear_error(server, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(AssetError, match="set LORA_DATA_DIR to a writable folder"):
        fetch(REL, server.url("/blob.bin"))


def test_the_checkout_is_found_from_the_working_directory_for_an_installed_package(
    monkeypatch, tmp_path
):
    """pip install . puts the package in site-packages; notebooks run from a checkout still
    find its data/ and results/ (and print paths relative to it)."""
    installed = tmp_path / "site-packages" / "lora_helpers" / "assets.py"
    monkeypatch.setattr(assets, "__file__", str(installed))
    monkeypatch.delenv("LORA_DATA_DIR", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")
    assert assets.checkout() == ROOT
    assert data_dir() == ROOT / "data"
    monkeypatch.chdir(tmp_path)
    assert assets.checkout() is None


def test_write_atomically_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "kept.json"
    assert assets.write_atomically(path, "old\n") == path
    assets.write_atomically(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"

    def full_disk(self, data):  # writes a piece of the temporary file, then fails
        with open(self, "wb") as f:
            f.write(data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        assets.write_atomically(path, b"would be cut short")
    assert path.read_bytes() == b"new bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]  # no .part left behind
