"""Learning rules. Every module in this folder is imported, so its ``@register`` lines run."""

import importlib
import pkgutil

from .base import (
    Rule,
    SeedScalarRule,
    accumulate_grad,
    available_rules,
    build_rule,
    check_finite,
    get_rule,
    register,
    rule_class,
    rule_options,
    trainable_parameters,
)

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "Rule",
    "SeedScalarRule",
    "accumulate_grad",
    "available_rules",
    "build_rule",
    "check_finite",
    "get_rule",
    "register",
    "rule_class",
    "rule_options",
    "trainable_parameters",
]
