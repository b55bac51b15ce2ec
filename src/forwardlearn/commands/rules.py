"""``forwardlearn rules``: every registered rule with a one-line description and its paper."""

from __future__ import annotations

import argparse

NAME = "rules"
HELP = "list every learning rule with a one-line description and its paper"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", help="also print each rule's options and defaults")


def run(args: argparse.Namespace) -> int:
    from ..rules import available_rules, rule_class, rule_options

    names = available_rules()
    width = max(len(n) for n in names)
    for n in names:
        cls = rule_class(n)
        print(f"{n:<{width}}  {cls.description}")
        print(f"{'':<{width}}  paper: {cls.paper}")
        if args.verbose:
            opts = ", ".join(f"{k}={v!r}" for k, v in rule_options(n).items() if k != "loss")
            print(f"{'':<{width}}  options: {opts}")
            print(f"{'':<{width}}  defaults: {cls.defaults}")
    return 0
