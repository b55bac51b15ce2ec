"""Command line: ``forwardlearn VERB ...`` (also ``python -m forwardlearn``).

Each verb is a module in ``forwardlearn/commands/`` with ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; they are discovered, so a new verb is one new file. Bad input
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``, ``OSError``) becomes one line on stderr, naming the
rule when a rule raised it, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import commands


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2 (``--help`` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="forwardlearn", description="Train neural networks without backpropagation, and measure the cost."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{m.name}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _raising_rule(e: BaseException) -> str | None:
    """The name of the innermost rule (a ``Rule`` method or classmethod) on ``e``'s traceback, if any."""
    base = sys.modules.get("forwardlearn.rules.base")
    if base is None:  # no rule was ever imported, so none raised
        return None
    name: str | None = None
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        first = code.co_varnames[0] if code.co_argcount else ""
        owner = tb.tb_frame.f_locals.get(first) if first in ("self", "cls") else None
        if isinstance(owner, base.Rule) or (isinstance(owner, type) and issubclass(owner, base.Rule)):
            name = owner.name or name
        tb = tb.tb_next
    return name


def error_line(e: BaseException) -> str:
    """``e`` as the one stderr line of a failed command: its first line, prefixed with the rule that raised it."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    rule = _raising_rule(e)
    if rule and not sys.modules["forwardlearn.rules.base"].names_rule(rule, msg):
        msg = f"rule {rule!r}: {msg}"
    return f"forwardlearn: error: {msg}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("forwardlearn: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
