"""Argument checks shared by the public entry points, so that the same mistake reads the same everywhere."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["as_int", "check_int"]


def as_int(value: Any) -> int | None:
    """`value` as an `int` if it is a Python, NumPy or 0-d tensor integer; None for anything else (bools, floats)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or getattr(value, "ndim", 0) != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """Return `value` as an `int` if it is an integer ([`as_int`]) in `[minimum, maximum]`, else raise a `ValueError`.

    Args:
        value: What the caller passed.
        name: How the caller spells the argument, e.g. `"LPTConfig.top_k"` or `` "`num_classes`" ``.
        minimum: Smallest valid value.
        maximum: Largest valid value, or None for no bound.
        hint: Appended to the message: why the bound holds, or how to fix the value.

    Returns:
        `value`, as an `int`.

    Raises:
        ValueError: "<name> must be an integer >= <minimum> [and <= <maximum>], got <value>. <hint>"
    """
    number = as_int(value)
    if number is not None and number >= minimum and (maximum is None or number <= maximum):
        return number
    bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}." + (f" {hint}" if hint else ""))
