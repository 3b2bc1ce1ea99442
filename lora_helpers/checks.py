"""Argument checks that many functions share, so that one mistake reads the same everywhere."""

from __future__ import annotations

import math
import numbers


def is_positive_int(value: object) -> bool:
    """True for an int >= 1; False for anything else, bools and numpy integers included."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int(name: str, value: object, hint: str = "") -> int:
    """Return `value` if is_positive_int(value); else raise ValueError naming `name`.

    `hint`, when given, ends the message, e.g. "typical values are 4, 8 or 16". A numpy
    integer is refused with the fix (int(...)): it would not survive a JSON config.
    """
    if not is_positive_int(value):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
            hint = f"pass int({name}); its type is {type(value).__name__}, not int"
        end = f"; {hint}." if hint else "."
        raise ValueError(f"{name} must be a positive integer, got {value!r}{end}")
    return value


def is_positive_number(value: object) -> bool:
    """True for a finite real number > 0 (a bool is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf


def dropout_probability(p: float, name: str = "A dropout probability") -> float:
    """`p` as a plain float (-0.0 as 0.0); ValueError naming `name` unless a number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}.")
    return float(p) + 0.0
