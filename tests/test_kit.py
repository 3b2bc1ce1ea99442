"""The offline classroom kit: gathered from local copies or a (loopback) download, then checked."""

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest
from _http_server import FileServer

from lora_helpers import data, gpt2, kit

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason="needs the offline copies in ../shared/assets"
)
TOKENIZER = ["gpt2-tokenizer/encoder.json", "gpt2-tokenizer/vocab.bpe"]
FAKE_WEIGHTS = b"not really GPT-2, but the bytes the patched checksum expects"


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No local copies, an empty cache, the network allowed (it is only loopback here)."""
    monkeypatch.setenv("LORA_ASSETS_PATH", "")
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORA_OFFLINE", raising=False)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    return monkeypatch


@pytest.fixture
def fake_small_weights(env, tmp_path):
    """A folder holding gpt2/gpt2-small/model.safetensors whose checksum the series accepts."""
    source = tmp_path / "weights-source"
    path = source / gpt2.weights_relpath("gpt2-small")
    path.parent.mkdir(parents=True)
    path.write_bytes(FAKE_WEIGHTS)
    expected = gpt2.WEIGHT_FILES["gpt2-small"]._replace(
        sha256=hashlib.sha256(FAKE_WEIGHTS).hexdigest(), size=len(FAKE_WEIGHTS)
    )
    env.setitem(gpt2.WEIGHT_FILES, "gpt2-small", expected)
    return source


def statuses(items):
    return {item.name: item.status for item in items}


@needs_shared
def test_download_gathers_local_copies_offline(env, tmp_path, fake_small_weights):
    env.setenv("LORA_ASSETS_PATH", os.pathsep.join([str(SHARED), str(fake_small_weights)]))
    env.setenv("LORA_OFFLINE", "1")
    before = dict(os.environ)
    folder = tmp_path / "kit"
    items = kit.download(folder)
    assert dict(os.environ) == before
    assert statuses(items) == {
        "GPT-2 tokenizer": "ok",
        "SMS Spam Collection": "ok",
        "GPT-2 weights gpt2-small": "ok",
    }
    for relpath in [*TOKENIZER, data.SMS_RELPATH]:
        assert (folder / relpath).read_bytes() == (SHARED / relpath).read_bytes()
    assert (folder / "gpt2/gpt2-small/model.safetensors").read_bytes() == FAKE_WEIGHTS
    assert not list(folder.rglob("*.part"))


@needs_shared
def test_download_fetches_what_is_not_local_over_http(env, tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.write(SHARED / data.SMS_RELPATH, "SMSSpamCollection")
        z.writestr("readme", "SMS Spam Collection v.1")
    files = {f"/{r}": (SHARED / r).read_bytes() for r in TOKENIZER}
    files["/sms.zip"] = archive.getvalue()
    with FileServer(files) as server:
        for relpath in TOKENIZER:
            _, sha256 = gpt2.TOKENIZER_FILES[relpath]
            env.setitem(gpt2.TOKENIZER_FILES, relpath, (server.url(f"/{relpath}"), sha256))
        env.setattr(data, "SMS_URL", server.url("/sms.zip"))
        items = kit.download(tmp_path / "kit", gpt2_sizes=())
    assert sorted(path for path, _ in server.requests) == sorted(files)
    assert statuses(items) == {"GPT-2 tokenizer": "ok", "SMS Spam Collection": "ok"}
    assert not (tmp_path / "cache").exists(), "the download went to the kit, not the cache"


@needs_shared
def test_check_finds_a_corrupt_file_and_names_it(env, tmp_path, fake_small_weights, capsys):
    env.setenv("LORA_ASSETS_PATH", os.pathsep.join([str(SHARED), str(fake_small_weights)]))
    folder = tmp_path / "kit"
    kit.download(folder)
    (folder / "gpt2/gpt2-small/model.safetensors").write_bytes(FAKE_WEIGHTS[::-1])
    (folder / TOKENIZER[1]).write_text("#version: 0.2\n")
    items = {item.name: item for item in kit.check(folder)}
    assert items["SMS Spam Collection"].status == "ok"
    assert items["GPT-2 weights gpt2-small"].status == "bad"
    assert "sha256" in items["GPT-2 weights gpt2-small"].detail
    assert items["GPT-2 tokenizer"].status == "bad"
    assert "vocab.bpe" in items["GPT-2 tokenizer"].detail
    assert kit.main(["check", str(folder)]) == 1
    assert "Fix it:" in capsys.readouterr().out


def test_check_of_an_empty_folder_lists_everything_missing(env, tmp_path, capsys):
    assert kit.main(["check", str(tmp_path), "--gpt2", "gpt2-small", "gpt2-medium"]) == 1
    out = capsys.readouterr().out
    names = ["tokenizer", "SMS Spam Collection", "weights gpt2-small", "weights gpt2-medium"]
    missing = [line for line in out.splitlines() if line.strip().startswith("missing")]
    assert [any(name in line for line in missing) for name in names] == [True] * 4
    assert len(missing) == 4
    assert "--gpt2 gpt2-small gpt2-medium" in out


def test_check_also_verifies_sizes_found_in_the_kit(env, tmp_path):
    (tmp_path / "gpt2" / "gpt2-large").mkdir(parents=True)
    (tmp_path / "gpt2" / "gpt2-large" / "model.safetensors").write_bytes(b"broken")
    items = {item.name: item.status for item in kit.check(tmp_path, gpt2_sizes=())}
    assert items["GPT-2 weights gpt2-large"] == "bad"


def test_unknown_size_is_refused_before_any_download(env, tmp_path, capsys):
    assert kit.main(["download", str(tmp_path / "kit"), "--gpt2", "gpt2-huge"]) == 2
    assert "Unknown GPT-2 size 'gpt2-huge'" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


def test_a_file_is_not_a_kit_folder(env, tmp_path, capsys):
    (tmp_path / "kit").write_text("")
    assert kit.main(["download", str(tmp_path / "kit"), "--gpt2"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert kit.main(["check", str(tmp_path / "kit")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err
    assert "download" not in err


def test_offline_download_says_what_is_missing(env, tmp_path, capsys):
    env.setenv("LORA_OFFLINE", "1")
    assert kit.main(["download", str(tmp_path / "kit"), "--gpt2"]) == 2
    assert "LORA_OFFLINE=1 is set" in capsys.readouterr().err


def test_a_failed_download_removes_only_the_folders_it_created(env, tmp_path):
    env.setenv("LORA_OFFLINE", "1")
    with pytest.raises(kit.AssetError):
        kit.download(tmp_path / "new" / "kit", ())
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(kit.AssetError):
        kit.download(tmp_path / "old", ())
    assert (tmp_path / "old").is_dir()


def test_missing_requirements_names_absent_and_old_packages(monkeypatch):
    fake = ["torch>=99", "no-such-package-xyz>=1", "tqdm>=4", 'pytest>=99; extra == "test"']
    monkeypatch.setattr(kit.importlib.metadata, "requires", lambda name: fake)
    problems = kit.missing_requirements()
    assert len(problems) == 2
    assert problems[0] == f"torch>=99 ({kit.importlib.metadata.version('torch')} installed)"
    assert problems[1] == "no-such-package-xyz>=1 (not installed)"


def test_missing_requirements_of_this_environment_is_empty():
    assert kit.missing_requirements() == []
    assert "not installed" in kit.missing_requirements("no-such-distribution-xyz")[0]


def test_display_path_is_relative_to_the_repository_or_home():
    repo = Path(__file__).resolve().parents[1]
    assert kit.display_path(repo / "data") == "data"
    beside = repo.parent / "a-kit-beside-the-repository" / "gpt2-tokenizer"
    assert kit.display_path(beside) == "../a-kit-beside-the-repository/gpt2-tokenizer"
    assert kit.display_path(Path.home() / ".cache" / "x") == "~/.cache/x"


def test_locate_looks_on_the_assets_path_first_then_the_cache(env, tmp_path):
    usb = tmp_path / "usb"
    (usb / data.SMS_RELPATH).parent.mkdir(parents=True)
    (usb / data.SMS_RELPATH).write_text("ham\thi\n")
    cached = tmp_path / "cache" / "gpt2-tokenizer" / "encoder.json"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    env.setenv("LORA_ASSETS_PATH", str(usb))
    found = dict(kit.locate(("gpt2-medium",)))
    assert found == {
        "GPT-2 tokenizer": cached,
        "SMS Spam Collection": usb / data.SMS_RELPATH,
        "GPT-2 weights gpt2-medium": None,
    }
