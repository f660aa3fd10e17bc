"""Integer arithmetic on sizes, in one place."""

from __future__ import annotations

__all__ = ["ceil_div", "round_up"]


def ceil_div(n: int, d: int) -> int:
    """``n / d`` rounded up, for non-negative ``n`` and positive ``d`` (blocks covering n bytes)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (e.g. a page)."""
    return ceil_div(n, multiple) * multiple
