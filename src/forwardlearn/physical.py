"""Physical layers as black boxes: known only as input -> output maps, no gradient passes through them.

Momeni et al. (2023, "Backpropagation-free training of deep physical neural networks", Science 382,
1297; arXiv:2304.11042) build deep networks that interleave fixed physical systems (acoustic,
microwave, optical) with trainable digital layers, and train the digital layers without a model of
the physics. This module provides

- :class:`BlackBox`: wraps any function (torch or NumPy) as an ``nn.Module``. Its output carries no
  gradient path to its input; if a backward pass would have to cross it, it raises a
  ``RuntimeError`` naming the layer.
- :class:`SimulatedPhysicalLayer`: a bundled stand-in for an optical layer (phase encoding on a
  spatial light modulator, a fixed random complex scattering medium, intensity detection on a
  camera), with measurement noise and optional drift of the medium.
- :func:`physical_network`: a hybrid physical/digital network ``[physical -> Linear -> ReLU] * k``,
  the architecture that the ``model_free_ff`` rule trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class _NoGradient(torch.autograd.Function):
    """Identity on the measured output; its backward refuses to pass a gradient to the input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, name: str) -> Tensor:
        ctx.layer_name = name
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        raise RuntimeError(
            f"no gradient can pass through the black-box physical layer {ctx.layer_name!r}: it is known only as "
            "an input -> output map. Train the layers around it with a rule that does not backpropagate through "
            "it (for example 'model_free_ff'), or detach its input."
        )


class BlackBox(nn.Module):
    """A layer computed by an opaque function ``fn``; no gradient can pass through it.

    Args:
        fn: ``fn(x) -> y`` on a batch. Called on a detached tensor (or, with ``numpy=True``, on a
            NumPy array; any array-like result is converted back to a tensor on the input's device).
        numpy: call ``fn`` with NumPy arrays.
        name: the layer's name in error messages (default: the function's name).

    When the input requires a gradient, the output is attached to it by an operation whose backward
    raises ``RuntimeError`` naming this layer, so backpropagation through the layer fails loudly
    instead of silently training with a missing gradient. Layers *after* the black box can still be
    trained by any rule.
    """

    def __init__(self, fn: Callable[[Any], Any] | None = None, *, numpy: bool = False, name: str | None = None) -> None:
        super().__init__()
        if fn is not None and not callable(fn):
            raise ValueError(f"BlackBox needs a callable fn(x), got {type(fn).__name__}")
        if fn is None and type(self).measure is BlackBox.measure:
            raise ValueError("BlackBox needs a function fn(x) (or a subclass that overrides measure)")
        self.fn = fn
        self.numpy = bool(numpy)
        self.name = name or getattr(fn, "__name__", None) or type(self).__name__

    def measure(self, x: Tensor) -> Tensor:
        """Run the black box on a detached batch and return the result as a tensor like ``x``."""
        assert self.fn is not None
        if self.numpy:
            y = self.fn(x.detach().cpu().numpy())
        else:
            y = self.fn(x.detach())
        if not isinstance(y, Tensor):
            y = torch.as_tensor(np.asarray(y))
        dtype = x.dtype if x.is_floating_point() and y.is_floating_point() else y.dtype
        return y.to(device=x.device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = self.measure(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _NoGradient.apply(x, y, self.name)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class SimulatedPhysicalLayer(BlackBox):
    """A simulated optical layer: phase encoding, random scattering medium, intensity detection.

    ``x`` (``in_features`` values, nominally in ``[0, 1]``) sets the phases ``pi * x`` of a coherent
    field on a spatial light modulator; the field crosses a fixed random complex transmission matrix
    ``T`` (``out_features x in_features``, i.i.d. complex Gaussian, the standard model of a multiple
    scattering medium); a camera records the intensity ``|T e^{i pi x}|^2 / in_features`` (mean ~1),
    with additive Gaussian read-out noise of standard deviation ``noise``. The map is nonlinear
    (interference of the phase-encoded inputs) and the trainer never sees ``T``.

    ``drift > 0`` lets the medium wander during use, as real ones do with temperature: after every
    call ``T <- sqrt(1 - drift^2) T + drift G`` with fresh Gaussian ``G`` (a stationary random walk:
    the statistics of ``T`` stay the same while its realisation decorrelates by a factor
    ``sqrt(1 - drift^2)`` per call). ``T`` is kept as two real buffers, so the drifted medium is saved
    with the model. Noise and drift come from a generator seeded by ``seed``. Runs on the input's
    device.
    """

    def __init__(self, in_features: int, out_features: int, *, noise: float = 0.01, drift: float = 0.0,
                 seed: int = 0, name: str | None = None) -> None:
        for v, what in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a non-negative number, got {noise!r}")
        if not (isinstance(drift, (int, float)) and 0 <= drift <= 1):
            raise ValueError(f"drift must be a number in [0, 1], got {drift!r}")
        super().__init__(None, name=name or f"simulated optics {in_features}->{out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.noise, self.drift, self.seed = float(noise), float(drift), int(seed)
        g = torch.Generator().manual_seed(seed)
        scale = 1 / math.sqrt(2)
        self.register_buffer("t_real", torch.randn(out_features, in_features, generator=g) * scale)
        self.register_buffer("t_imag", torch.randn(out_features, in_features, generator=g) * scale)
        self._gen = torch.Generator().manual_seed(seed + 1)
        self.calls = 0

    def _randn(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self._gen).to(device=like.device, dtype=like.dtype)

    def measure(self, x: Tensor) -> Tensor:
        xs = x.detach().flatten(1)
        if xs.shape[1] != self.in_features:
            raise ValueError(f"{self.name}: expected {self.in_features} input features, got {xs.shape[1]}")
        dtype = xs.dtype if xs.is_floating_point() else torch.float32
        xs = xs.to(dtype)
        tr, ti = self.t_real.to(dtype), self.t_imag.to(dtype)
        c, s = torch.cos(torch.pi * xs), torch.sin(torch.pi * xs)
        re = c @ tr.t() - s @ ti.t()
        im = c @ ti.t() + s @ tr.t()
        intensity = (re * re + im * im) / self.in_features
        if self.noise > 0:
            intensity = intensity + self.noise * self._randn(tuple(intensity.shape), intensity)
        if self.drift > 0:
            keep = math.sqrt(1 - self.drift**2)
            self.t_real.mul_(keep).add_(self.drift / math.sqrt(2) * self._randn(tuple(self.t_real.shape), self.t_real))
            self.t_imag.mul_(keep).add_(self.drift / math.sqrt(2) * self._randn(tuple(self.t_imag.shape), self.t_imag))
        self.calls += 1
        return intensity

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, noise={self.noise}, drift={self.drift}, seed={self.seed}"


def physical_network(
    in_features: int,
    hidden: Sequence[int],
    physical_width: int = 256,
    *,
    every_layer: bool = True,
    noise: float = 0.01,
    drift: float = 0.0,
    seed: int = 0,
) -> nn.Sequential:
    """``Flatten -> [SimulatedPhysicalLayer -> Linear -> ReLU] * len(hidden)``: a deep physical network.

    Every block starts with a fixed physical layer of ``physical_width`` outputs (each with its own
    medium, seeds ``seed, seed+1, ...``) followed by a trainable digital layer; with
    ``every_layer=False`` only the first block has one (a physical front end, through which no
    gradient ever needs to pass). There is no class read-out: ``model_free_ff`` classifies by goodness.
    """
    hidden = list(hidden)
    if not hidden:
        raise ValueError("physical_network needs at least one hidden width")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for i, h in enumerate(hidden):
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
            raise ValueError(f"hidden width must be a positive integer, got {h!r}")
        if i == 0 or every_layer:
            layers.append(SimulatedPhysicalLayer(width, physical_width, noise=noise, drift=drift, seed=seed + i))
            width = physical_width
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers)
