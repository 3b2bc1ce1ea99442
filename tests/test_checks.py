"""The shared argument check: what counts as a positive integer, and its message."""

import numpy as np
import pytest

from lora_helpers.checks import is_positive_int, positive_int


@pytest.mark.parametrize("value", [1, 7, 10**12])
def test_positive_integers_pass_and_come_back(value):
    assert is_positive_int(value)
    assert positive_int("rank", value) == value


@pytest.mark.parametrize("value", [0, -3, 2.0, 1.5, True, False, "4", None, np.int64(4)])
def test_everything_else_is_refused_naming_the_argument_and_the_value(value):
    assert not is_positive_int(value)
    with pytest.raises(ValueError, match=r"^steps must be a positive integer, got .+\.$"):
        positive_int("steps", value)


def test_a_hint_ends_the_message():
    with pytest.raises(ValueError, match=r"^rank must be a positive integer, got 0; try 8\.$"):
        positive_int("rank", 0, "try 8")


def test_a_numpy_integer_gets_the_fix():
    with pytest.raises(
        ValueError, match=r"got np.int64\(4\); pass int\(rank\); its type is int64, not int\.$"
    ):
        positive_int("rank", np.int64(4))
