"""Argument parsing shared by the training verbs."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
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


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["directions=4", "eps=1e-3", "variant=usf"]`` -> a dict, values read as Python literals when they are."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt takes KEY=VALUE, got {item!r}")
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


def run_directory(args: argparse.Namespace, resume: bool) -> Path:
    """``--out`` (default ``runs/<rule>-<data>``); refuses to overwrite a run unless resuming."""
    out = Path(args.out or f"runs/{args.rule}-{args.data}")
    if (out / "checkpoint.pt").exists() and not resume:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    return out


def check_resume(out: Path, cfg: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse to resume ``out`` when one of ``keys`` of ``cfg`` differs from the setting its checkpoint was
    trained with (more ``epochs`` is fine: that is what resuming is for)."""
    from ..training.checkpoint import read_config

    path = out / "checkpoint.pt"
    if not path.exists():
        return
    old = read_config(path)
    changed = [k for k in keys if k in old and old[k] != cfg[k]]
    if changed:
        raise ValueError(f"resuming {out} with settings that differ from its checkpoint: {', '.join(changed)}")


RESUME_KEYS = ("rule", "data", "model", "hidden", "activation", "batch_size", "optimizer", "lr", "seed")


def training_config(args: argparse.Namespace, defaults: dict[str, Any], hidden: list[int] | None) -> dict[str, Any]:
    """The settings of a training run: command-line values, else the rule's documented defaults."""
    return {
        "rule": args.rule,
        "data": args.data,
        "model": args.model or defaults.get("model", "mlp"),
        "hidden": hidden if hidden is not None else list(defaults.get("hidden") or []),
        "activation": args.activation,
        "epochs": args.epochs or defaults["epochs"],
        "batch_size": args.batch_size or defaults["batch_size"],
        "lr": args.lr or defaults["lr"],
        "optimizer": args.optimizer or defaults["optimizer"],
        "seed": args.seed,
    }
