"""Models built from a spec: ``from_spec({"name": "mlp", "hidden": [256]}, shape, classes)``.

A spec is a ``dict`` of plain values: ``name`` (a key of :data:`MODELS`), ``hidden`` (widths), and the
builder's own options (``activation``, ``init``, ...). A rule says which model it trains by the spec its
``model_spec()`` returns, so a run config can change the widths without knowing the rule's model kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from .basic import build, he_uniform_
from .convergent import ConvergentNet
from .gnn import GNN

Builder = Callable[[dict[str, Any], tuple[int, ...], int], nn.Module]
MODELS: dict[str, Builder] = {}
#: initialisations a spec may name (``init``), applied after the builder
INITS: dict[str, Callable[[nn.Module], nn.Module]] = {"he_uniform": he_uniform_}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: add ``builder(spec, shape, classes) -> nn.Module`` to :data:`MODELS` as ``name``."""

    def add(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder

    return add


@register_model("mlp")
def _mlp(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    return build("mlp", shape, classes, spec.get("hidden"), spec.get("activation", "relu"))


@register_model("cnn")
def _cnn(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    return build("cnn", shape, classes, spec.get("hidden"), spec.get("activation", "relu"))


@register_model("rescnn")
def _rescnn(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    """Conv stem + BatchNorm + one residual block + linear head (:mod:`.zoo`); images ``(C, H, W)``."""
    return build("rescnn", shape, classes)


@register_model("transformer")
def _transformer(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    """Image rows as tokens through one transformer encoder layer (:mod:`.zoo`); images ``(C, H, W)``."""
    return build("transformer", shape, classes)


@register_model("convergent")
def _convergent(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    return ConvergentNet(math.prod(shape), list(spec["hidden"]), classes)


@register_model("gnn")
def _gnn(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    """Node features ``shape = (F,)``; ``head=False`` leaves out the output layer (layer-local graph rules)."""
    return GNN(int(shape[-1]), list(spec["hidden"]), classes if spec.get("head", True) else None,
               kind=spec.get("kind", "gcn"))


@register_model("physical")
def _physical(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    """A simulated physical front end of ``physical_width`` outputs, then ``hidden`` digital layers; the network
    records ``classes`` (attribute ``classes``) for rules that score every class by goodness."""
    from ..physical import physical_network

    net = physical_network(math.prod(shape), list(spec["hidden"]), spec.get("physical_width", 256),
                           every_layer=spec.get("every_layer", False))
    net.classes = classes
    return net


def from_spec(spec: dict[str, Any], shape: tuple[int, ...], classes: int) -> nn.Module:
    """The model ``spec`` describes, for inputs of ``shape`` (one example) and ``classes`` classes."""
    name = spec.get("name")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    init = spec.get("init")
    if init is not None and init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(sorted(INITS))}")
    model = MODELS[name](spec, tuple(shape), classes)
    return INITS[init](model) if init is not None else model


__all__ = ["INITS", "MODELS", "from_spec", "register_model"]
