"""Argument parsing shared by the training verbs."""

from __future__ import annotations

import argparse
import ast
from typing import Any


def parse_hidden(text: str | None) -> list[int] | None:
    """``"500,500"`` -> ``[500, 500]``; anything else raises ``ValueError`` naming the bad value."""
    if text is None:
        return None
    try:
        widths = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--hidden must be comma-separated positive integers like 500,500, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"--hidden must be comma-separated positive integers like 500,500, got {text!r}")
    return widths


#: rule keywords that a verb sets from its own flag; in ``--opt`` they would reach the rule twice
RESERVED_OPTIONS: dict[str, str] = {"seed": "--seed"}


def parse_options(items: list[str] | None, reserved: dict[str, str] = RESERVED_OPTIONS) -> dict[str, Any]:
    """``["directions=4", "eps=1e-3", "variant=usf"]`` -> a dict, values read as Python literals when they are.

    A key of ``reserved`` (keyword -> the flag that sets it) raises ``ValueError`` naming that flag."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt takes KEY=VALUE, got {item!r}")
        if key in reserved:
            raise ValueError(f"--opt {item}: {key!r} is set by {reserved[key]}, not by --opt")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def positive(kind: type, what: str):  # noqa: ANN201 - argparse type factory
    def convert(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a positive {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{what} must be a positive {kind.__name__}, got {text!r}")
        return v

    return convert


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="data set (default: digits, bundled)")
    p.add_argument("--data-dir", default=None, help="data cache (default $FORWARDLEARN_DATA or ~/.cache/forwardlearn)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive(int, "--threads"), default=None,
                   help="torch CPU threads (compare: default 1)")
