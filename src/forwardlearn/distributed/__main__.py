"""``python -m forwardlearn.distributed ...``: ``forwardlearn train`` with the seed-and-scalar options.

The same as ``forwardlearn train --distributed ...``; under ``torchrun`` (``torchrun --nproc-per-node 2
-m forwardlearn.distributed --rule zo_spsa --distributed ...``) each process is one rank.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The options of ``forwardlearn train`` plus the seed-and-scalar ones."""
    from ..cli import OneLineParser
    from ..commands import train
    from .trainer import add_distributed_arguments

    parser = OneLineParser(prog="python -m forwardlearn.distributed", description=__doc__)
    train.add_arguments(parser)
    if not any(a.dest == "distributed" for a in parser._actions):
        add_distributed_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import error_line
    from .trainer import train_distributed

    args = build_parser().parse_args(argv)
    try:
        return train_distributed(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
