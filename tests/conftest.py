"""Fixtures shared by the unit tests (environment settings are in the repository's conftest.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, without fighting other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
