"""The cells of the benchmark tables: numbers, megabytes, percentages and ``mean ± sd``; ``-`` for a missing value."""

from __future__ import annotations

from typing import Any

__all__ = ["MB", "mb", "num", "pct", "pm"]

MB = 2**20


def num(v: Any, fmt: str) -> str:
    """``v`` in ``fmt``; ``-`` for ``None`` or NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, fmt)


def mb(v: Any) -> str:
    """Bytes as megabytes (2**20) with one decimal."""
    return "-" if v is None else f"{v / MB:.1f}"


def pct(v: Any) -> str:
    """A fraction as a percentage with two decimals."""
    return "-" if v is None else f"{100 * v:.2f}%"


def pm(mean: Any, sd: Any, fmt: str) -> str:
    """``mean ± sd`` (``-`` for a missing mean; the mean alone when there is no sd)."""
    if mean is None:
        return "-"
    return format(mean, fmt) + ("" if sd is None else f" ± {format(sd, fmt)}")
