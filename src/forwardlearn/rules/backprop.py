"""The reference: ordinary reverse-mode backpropagation (Rumelhart, Hinton & Williams 1986)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ..data.batches import Inputs, call_model, logits_of
from .base import Rule, check_finite, register


@register
class Backprop(Rule):
    """Exact gradient of ``loss(model(inputs), targets)`` by ``loss.backward()``.

    Every other rule is measured against this one.
    """

    name: ClassVar[str] = "backprop"
    backward: ClassVar[str] = "global"
    description: ClassVar[str] = "reference: exact gradient by reverse-mode automatic differentiation"
    paper: ClassVar[str] = "Rumelhart, Hinton & Williams 1986, Learning representations by back-propagating errors"
    defaults: ClassVar[dict] = {**Rule.defaults, "lr": 2e-3}

    def grads(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        loss = self.loss(logits_of(call_model(model, inputs)), targets)
        value = check_finite(loss.detach(), "loss")
        loss.backward()
        self.steps += 1
        return value
