"""Writing a learning rule: one class with ``@register``, then every tool of the library uses it.

    python examples/new_rule.py

The rule here trains only the last layer of an MLP, with its exact local gradient written out by hand
(``dW = (softmax(z) - onehot(y))^T h / N``), on top of fixed random hidden features: the classic
random-features baseline (Rahimi & Recht 2007) that any learning rule for the hidden layers should beat.
In the library itself such a class would be one file under ``src/forwardlearn/rules/``; the package
imports every module there, so nothing else needs registering.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forwardlearn as fl
from forwardlearn.rules.base import Rule, accumulate_grad, check_finite, register


@register
class LastLayerOnly(Rule):
    """Train the final ``Linear`` of an MLP by its exact gradient; the hidden layers stay as initialised."""

    name: ClassVar[str] = "example_last_layer"
    description: ClassVar[str] = "random features: only the last layer learns, by its local delta rule"
    paper: ClassVar[str] = "Rahimi & Recht 2007, Random Features for Large-Scale Kernel Machines"
    defaults: ClassVar[dict[str, Any]] = {**Rule.defaults, "lr": 1e-2, "hidden": [512]}
    forward_only: ClassVar[bool] = True  # no backward pass: the one gradient is written out

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        *body, head = list(model.children())
        with torch.no_grad():
            h = inputs
            for layer in body:
                h = layer(h)
            logits = head(h)
            loss = check_finite(F.cross_entropy(logits, targets), "loss")
            delta = (logits.softmax(1) - F.one_hot(targets, logits.shape[1]).to(logits.dtype)) / len(targets)
            accumulate_grad(head.weight, delta.t() @ h)
            accumulate_grad(head.bias, delta.sum(0))
        self.steps += 1
        return loss


def main() -> float:
    assert "example_last_layer" in fl.available_rules()
    rule = fl.get_rule("example_last_layer")
    torch.manual_seed(0)
    (X, y), (Xt, yt) = fl.data.load("digits", "train"), fl.data.load("digits", "test")
    model = fl.models.mlp(64, [512], 10)
    hist = fl.train(model, rule, train=(X, y), test=(Xt, yt), optimizer="adam", lr=1e-2, epochs=10,
                    batch_size=64, progress=False)
    quality = fl.diagnostics.gradient_alignment(model, rule, X[:256], y[:256])
    acc = hist.final["test_acc"]
    print(f"{rule.name}: test accuracy {acc:.3f} after 10 epochs; cosine to the full backprop gradient "
          f"{quality['cosine']:.3f} (the hidden layers get none of it)")
    return acc


if __name__ == "__main__":
    main()
