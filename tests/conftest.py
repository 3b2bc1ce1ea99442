"""Fixtures shared by the unit tests (environment settings are in the repository's conftest.py)."""

import pytest
import torch

from lora_helpers import data, studies
from lora_helpers.assets import AssetError, find_asset
from lora_helpers.gpt2 import TOKENIZER_FILES, get_tokenizer

GET_THE_FILES = (
    "run `python -m lora_helpers.kit download DIR` on a machine with network and set "
    "LORA_ASSETS_PATH=DIR here (see README, 'Without pretrained weights, without a GPU, "
    "without network')"
)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, without fighting other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_base():
    """studies.pretrained_model(), the frozen base of notebooks 06-08, trained once per test
    process on one thread (3-4 s). Tests must not change it: the studies copy it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return studies.pretrained_model()
    finally:
        torch.set_num_threads(threads)


def _or_skip(load, what: str, relpaths):
    """load(), or skip the test, naming the kit command, where the files cannot be had.

    Where every file has a local copy, errors are not skipped: a wrong copy fails the test.
    """
    if all(find_asset(relpath) for relpath in relpaths):
        return load()
    try:
        return load()
    except AssetError:
        pytest.skip(f"{what}: no local copy, and the download failed; {GET_THE_FILES}.")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's tokenizer (local copies first, else a download); skips where neither works."""
    return _or_skip(get_tokenizer, "GPT-2's tokenizer files", TOKENIZER_FILES)


@pytest.fixture(scope="session")
def sms_rows():
    """All rows of the SMS Spam Collection (local copies first, else a download); skips
    where neither works."""
    return _or_skip(data.load_sms_spam, "The SMS Spam Collection", [data.SMS_RELPATH])
