"""Argument checks shared by the public entry points, so that the same mistake reads the same everywhere."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """Return `value` if it is an integer (not a bool) in `[minimum, maximum]`, else raise a `ValueError`.

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
    valid = not isinstance(value, bool) and isinstance(value, int) and value >= minimum
    if valid and (maximum is None or value <= maximum):
        return int(value)
    bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}." + (f" {hint}" if hint else ""))
