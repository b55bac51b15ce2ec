"""Feed-forward models: a multilayer perceptron and a LeNet-like convolutional network."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


def activation_module(name: str) -> nn.Module:
    """A fresh activation layer by name; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


def _positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _dense(width: int, hidden: Sequence[int], classes: int, activation: str) -> list[nn.Module]:
    """``Linear -> activation`` per hidden width, then the ``Linear`` to ``classes``."""
    layers: list[nn.Module] = []
    for h in hidden:
        _positive_int(h, "hidden width")
        layers += [nn.Linear(width, h), activation_module(activation)]
        width = h
    return [*layers, nn.Linear(width, classes)]


def mlp(in_features: int, hidden: Sequence[int], classes: int, activation: str = "relu") -> nn.Sequential:
    """``Flatten -> [Linear -> activation] * len(hidden) -> Linear``.

    Inputs of any shape ``(N, ...)`` are flattened, so image tensors go in directly.
    """
    _positive_int(in_features, "in_features")
    _positive_int(classes, "classes")
    return nn.Sequential(nn.Flatten(), *_dense(in_features, hidden, classes, activation))


def cnn(
    in_channels: int,
    hidden: Sequence[int] = (120, 84),
    classes: int = 10,
    *,
    input_size: int | tuple[int, int] = 28,
    channels: Sequence[int] = (6, 16),
    activation: str = "relu",
    kernel_size: int = 5,
) -> nn.Sequential:
    """LeNet-like network: ``[Conv2d -> activation -> MaxPool2d] * len(channels) -> Flatten -> MLP head``.

    The arguments run as in :func:`mlp`: inputs, hidden (fully connected) widths, classes. Convolutions are
    padded ("same"), so the net also fits small inputs such as 8x8 digits.
    """
    if isinstance(hidden, int):
        raise ValueError(f"cnn(in_channels, hidden, classes, ...) takes the hidden widths second, got {hidden!r}; "
                         f"pass classes={hidden} by keyword or as the third argument")
    _positive_int(in_channels, "in_channels")
    _positive_int(classes, "classes")
    _positive_int(kernel_size, "kernel_size")
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    layers: list[nn.Module] = []
    c = in_channels
    for out in channels:
        _positive_int(out, "conv channels")
        layers += [
            nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2),
            activation_module(activation),
            nn.MaxPool2d(2),
        ]
        c = out
    layers.append(nn.Flatten())
    with torch.no_grad():
        width = nn.Sequential(*layers)(torch.zeros(1, in_channels, *hw)).shape[1]
    if width == 0:
        raise ValueError(f"input_size {input_size} is too small for {len(channels)} pooling stages")
    return nn.Sequential(*layers, *_dense(width, hidden, classes, activation))


def he_uniform_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """The papers' initialisation: every ``Linear`` weight ``U(-sqrt(6/fan_in), sqrt(6/fan_in))``, biases 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                limit = math.sqrt(6.0 / m.in_features)
                w = torch.rand(m.weight.shape, generator=generator, dtype=m.weight.dtype) * 2 - 1
                m.weight.copy_(w * limit)
                if m.bias is not None:
                    m.bias.zero_()
    return model


#: the names :func:`build` knows
BUILD_NAMES = ("cnn", "mlp", "rescnn", "transformer")


def build(
    name: str,
    shape: Sequence[int],
    classes: int,
    hidden: Sequence[int] | None = None,
    activation: str = "relu",
) -> nn.Module:
    """Build a model by name for inputs of ``shape`` (one example, e.g. ``(1, 28, 28)``).

    ``mlp`` takes ``hidden`` widths (default ``[256]``); ``cnn`` needs image inputs ``(C, H, W)`` and uses
    ``hidden`` as its fully connected widths (default ``(120, 84)``); ``rescnn`` (conv stem, BatchNorm, one residual
    block) and ``transformer`` (image rows as tokens, one encoder layer) need images and ignore ``hidden``
    (see :mod:`.zoo`).
    """
    if name == "mlp":
        features = 1
        for s in shape:
            features *= s
        return mlp(features, list(hidden) if hidden is not None else [256], classes, activation)
    if name == "cnn":
        if len(shape) != 3:
            raise ValueError(f"model 'cnn' needs image inputs (C, H, W), this data set has shape {tuple(shape)}")
        c, h, w = shape
        return cnn(c, tuple(hidden) if hidden else (120, 84), classes, input_size=(h, w), activation=activation)
    if name in ("rescnn", "transformer"):
        if len(shape) != 3:
            raise ValueError(f"model {name!r} needs image inputs (C, H, W), this data set has shape {tuple(shape)}")
        from .zoo import rescnn, transformer

        c, h, w = shape
        return rescnn(c, classes) if name == "rescnn" else transformer(c, h, w, classes)
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(BUILD_NAMES)}")
