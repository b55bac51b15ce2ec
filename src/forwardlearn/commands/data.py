"""``forwardlearn data fetch NAME`` and ``forwardlearn data list``."""

from __future__ import annotations

import argparse

NAME = "data"
HELP = "fetch and list data sets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    f = sub.add_parser("fetch", help="download a data set into the cache and verify every file")
    f.add_argument("name", help="data set name (mnist, fashion-mnist, spam-assassin)")
    f.add_argument("--data-dir", default=None,
                   help="cache directory (default $FORWARDLEARN_DATA or ~/.cache/forwardlearn)")
    f.add_argument("--quiet", action="store_true")
    ls = sub.add_parser("list", help="list the data sets and where their files come from")
    ls.add_argument("--data-dir", default=None)


def run(args: argparse.Namespace) -> int:
    from .. import data

    if args.action == "fetch":
        path = data.fetch(args.name, root=args.data_dir, progress=not args.quiet)
        print(f"{args.name}: verified files in {path}")
        return 0
    for name in data.available():
        spec = data.info(name)
        shape = "text" if spec.kind == "text" else "x".join(map(str, spec.shape))
        print(f"{name:<14} {shape:<10} {spec.classes:>3} classes  {spec.where}")
    return 0
