"""forwardlearn: train neural networks without backpropagation, and measure what that costs and buys.

A learning rule fills ``.grad``; ``torch.optim`` does the rest::

    import forwardlearn as fl
    rule = fl.get_rule("backprop")
    model = rule.attach(fl.models.mlp(64, [256], 10))
    history = fl.train(model, rule, train=fl.data.load("digits"), test=fl.data.load("digits", "test"))
"""

from . import data, diagnostics, models, physical, rules, training
from .rules import Rule, available_rules, get_rule, register
from .training import Callback, History, NonFiniteError, Trainer, train

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "History",
    "NonFiniteError",
    "Rule",
    "Trainer",
    "available_rules",
    "data",
    "diagnostics",
    "get_rule",
    "models",
    "physical",
    "register",
    "rules",
    "train",
    "training",
]
