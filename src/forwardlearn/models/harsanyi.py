"""HarsanyiNet: a network whose forward pass also yields the exact Shapley values of its input variables.

Chen, Lou, Zhang, Huang & Zhang, "HarsanyiNet: Computing Accurate Shapley Values in a Single Forward
Propagation", ICML 2023 (arXiv:2304.01811).

The idea (paper Sec. 3). The Harsanyi interactions ``I(S) = sum_{T in S} (-1)^{|S|-|T|} v(T)`` of the
coalitions ``S`` of input variables satisfy ``v(N) - v(empty) = sum_{S non-empty} I(S)``, and the Shapley
value is their even redistribution, ``phi(i) = sum_{S ni i} I(S) / |S|`` (Harsanyi 1963; Sec. 3.1).
HarsanyiNet is built so that every intermediate unit ``u`` *is* one interaction term: its output depends
only on the input variables of its receptive field ``R_u`` (the union of its children's receptive
fields) and is exactly zero as soon as any of those variables is masked to its baseline (an AND over
its children; the two requirements of Sec. 3.2). The output is a linear, bias-free read-out of every
unit of every layer (skip connections), so
``v(S) - v(empty) = sum_{u: R_u in S} w_u z_u(x)`` and hence ``I(S) = sum_{u: R_u = S} w_u z_u(x)``.
The Shapley values follow in the same forward pass (the paper's main theorem, Sec. 3.2)::

    phi(i) = sum_l sum_u [i in R_u] w_u^{(l)} z_u^{(l)}(x) / |R_u|

A Harsanyi unit of layer ``l`` (Sec. 3.2)::

    z_u = ReLU(W_u^T (Sigma_u z^{(l-1)})) * delta_u,    Sigma_u = diag(1[tau_u > 0])

``tau_u`` selects the children (trained with a straight-through estimator whose backward pass is
``beta * sigmoid'(tau)``), and ``delta_u`` is the AND gate: ``prod_{c in children} tanh(gamma |z_c|)``,
which is zero exactly when a child is zero; any such gate keeps the decomposition exact.

Two forms, as in the paper:

* **MLP form** (tabular data, input shape ``(F,)``): the input variables are the ``F`` features; the
  variable ``i`` enters as ``z^{(0)}_i = x_i - b_i`` where ``b`` is the baseline (buffer ``baseline``,
  default 0, which is the paper's choice on standardised data; :meth:`HarsanyiNet.set_baseline` sets,
  for example, the training mean). Units are scalars; children are chosen among all units of the
  previous layer (initially a random ``act_ratio`` fraction, as in the authors' code).
* **CNN form** (images, input shape ``(C, H, W)``): a convolutional stem
  ``z^{(0)} = ReLU(MaxPool2(Conv3x3(x)))`` as in the paper; the input variables are the ``H/2 x W/2``
  positions of ``z^{(0)}`` and a masked variable is the zero feature vector there (the paper's
  baseline). ``stem=False`` drops the stem: the variables are then the pixels, entering as
  ``x - baseline``. A unit is one position of a layer (a vector of ``channels`` values), its children
  a subset of its 3x3 neighbourhood; out-of-image neighbours are never children. The gate is the
  geometric mean over children of ``tanh(gamma ||z_c||_1)``, as in the authors' reference code.

``model(x)`` returns class scores; ``model(x, return_shapley=True, target=...)`` returns
``(scores, phi)`` with ``phi`` of shape ``(N, F)`` (MLP form) or ``(N, H', W')`` (CNN form), the exact
Shapley values of the chosen output (default: the predicted class) with respect to the baseline, so
``phi.sum() == scores[target] - scores_at_baseline[target]`` (efficiency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HarsanyiNet"]


class _StraightThrough(torch.autograd.Function):
    """Forward ``1[tau > 0]``; backward ``beta * sigmoid'(tau)`` (the straight-through estimator for ``tau``)."""

    @staticmethod
    def forward(ctx: Any, tau: Tensor, beta: float) -> Tensor:
        ctx.save_for_backward(tau)
        ctx.beta = beta
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau)
        return grad * ctx.beta * s * (1 - s), None


def _and_gate(t: Tensor, m: Tensor, geometric: bool) -> Tensor:
    """AND over the children: ``prod_k t_k^{m_k}`` (or its geometric mean), exactly 0 if a child has ``t = 0``.

    ``t``: ``(N, U, K)`` gate inputs in ``[0, 1)``; ``m``: ``(U, K)`` 0/1 child indicators (carrying the STE
    gradient). Units without children get 0.
    """
    tiny = torch.finfo(t.dtype).tiny
    logs = (torch.log(t.clamp_min(tiny)) * m).sum(-1)
    k = m.sum(-1)
    if geometric:
        logs = logs / k.clamp_min(1.0)
    dead = ((t == 0) & (m > 0)).any(-1) | (k == 0)
    return torch.where(dead, torch.zeros_like(logs), torch.exp(logs))


def _and_gate_dense(t: Tensor, m: Tensor) -> Tensor:
    """:func:`_and_gate` (product form) for dense children: ``t`` is ``(N, K)``, shared by every unit."""
    tiny = torch.finfo(t.dtype).tiny
    logs = torch.log(t.clamp_min(tiny)) @ m.T
    dead = ((t == 0).to(t.dtype) @ (m > 0).to(t.dtype).T > 0) | (m.sum(-1) == 0)
    return torch.where(dead, torch.zeros_like(logs), torch.exp(logs))


class HarsanyiLinear(nn.Module):
    """A layer of scalar Harsanyi units whose children may be any units of the previous layer (MLP form)."""

    def __init__(self, in_units: int, out_units: int, gamma: float, beta: float, act_ratio: float,
                 initial_tau: float) -> None:
        super().__init__()
        self.gamma, self.beta = gamma, beta
        self.weight = nn.Parameter(torch.empty(out_units, in_units))
        nn.init.xavier_uniform_(self.weight)
        # tau: -initial_tau, except a random act_ratio fraction (at least one) of children per unit
        tau = torch.full((out_units, in_units), -initial_tau)
        k = max(1, round(act_ratio * in_units))
        for u in range(out_units):
            tau[u, torch.randperm(in_units)[:k]] = initial_tau
        self.tau = nn.Parameter(tau)

    def child_matrix(self) -> Tensor:
        """Hard child indicators ``(out_units, in_units)``."""
        return (self.tau > 0).to(self.tau.dtype)

    def forward(self, z: Tensor) -> Tensor:  # z: (N, 1, in_units)
        z = z.squeeze(1)
        m = _StraightThrough.apply(self.tau, self.beta)
        g = z @ (self.weight * m).T
        delta = _and_gate_dense(torch.tanh(self.gamma * z.abs()), m)
        return (F.relu(g) * delta).unsqueeze(1)


class HarsanyiConv(nn.Module):
    """A layer of Harsanyi units on an ``H x W`` grid; each unit's children lie in its 3x3 neighbourhood."""

    def __init__(self, in_channels: int, out_channels: int, height: int, width: int, gamma: float,
                 beta: float, kernel_size: int = 3) -> None:
        super().__init__()
        self.gamma, self.beta = gamma, beta
        self.height, self.width = height, width
        k2 = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k2))
        nn.init.kaiming_normal_(self.weight.view(out_channels, in_channels, kernel_size, kernel_size),
                                mode="fan_out", nonlinearity="relu")
        v = height * width
        self.tau = nn.Parameter(torch.randn(v, k2) * 0.01)  # the authors' initialisation
        r = kernel_size // 2
        rows = torch.arange(height).repeat_interleave(width)
        cols = torch.arange(width).repeat(height)
        dr = torch.arange(-r, r + 1).repeat_interleave(kernel_size)
        dc = torch.arange(-r, r + 1).repeat(kernel_size)
        nr, nc = rows[:, None] + dr[None], cols[:, None] + dc[None]
        inside = (nr >= 0) & (nr < height) & (nc >= 0) & (nc < width)
        # neighbour index per (position, offset); index v is an always-zero padding slot
        self.register_buffer("neighbours", torch.where(inside, nr * width + nc, torch.full_like(nr, v)),
                             persistent=False)
        self.register_buffer("inside", inside.float(), persistent=False)

    def child_mask(self) -> Tensor:
        """Hard child indicators per (position, 3x3 offset); out-of-grid offsets are never children."""
        return (self.tau > 0).to(self.tau.dtype) * self.inside.to(self.tau.dtype)

    def child_matrix(self) -> Tensor:
        """Hard child indicators as a dense ``(V, V)`` matrix over grid positions."""
        v = self.height * self.width
        dense = torch.zeros(v, v + 1, dtype=self.tau.dtype, device=self.tau.device)
        dense.scatter_add_(1, self.neighbours, self.child_mask())
        return (dense[:, :v] > 0).to(self.tau.dtype)

    def forward(self, z: Tensor) -> Tensor:  # z: (N, C, V)
        n, c, v = z.shape
        k = self.inside.shape[1]
        m = (_StraightThrough.apply(self.tau, self.beta) * self.inside.to(self.tau.dtype)).T  # (K, V)
        r = math.isqrt(k) // 2
        # im2col with zero padding: column v holds the 3x3 neighbourhood of position v, offsets row-major
        patches = F.unfold(z.view(n, c, self.height, self.width), math.isqrt(k), padding=r)  # (N, C*K, V)
        g = self.weight.view(self.weight.shape[0], c * k) @ (patches.view(n, c, k, v) * m).view(n, c * k, v)
        a = z.abs().sum(1).view(n, 1, self.height, self.width)
        t = torch.tanh(self.gamma * F.unfold(a, math.isqrt(k), padding=r)).transpose(1, 2)  # (N, V, K)
        delta = _and_gate(t, m.T, geometric=True)
        return F.relu(g) * delta.unsqueeze(1)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


class HarsanyiNet(nn.Module):
    """HarsanyiNet (Chen et al., ICML 2023) in MLP form (``input_shape=(F,)``) or CNN form (``(C, H, W)``).

    Args:
        input_shape: ``F`` or ``(F,)`` for tabular inputs; ``(C, H, W)`` for images.
        classes: number of outputs.
        layers: number of Harsanyi layers (each feeds the output through its own linear map).
        hidden: units per layer (MLP form).
        channels: channels per position (CNN form; also the stem's output channels).
        stem: CNN form only: ``True`` (the paper) puts ``ReLU(MaxPool2(Conv3x3))`` before the Harsanyi
            layers, so the input variables are the cells of that ``H/2 x W/2`` map; ``False`` makes the
            pixels themselves the input variables.
        gamma: gate sharpness in ``tanh(gamma |z|)`` (default 100 for MLP form, 1 for CNN form, the
            authors' settings).
        beta: scale of the straight-through gradient of ``tau`` (default 10, the authors' MLP setting).
        act_ratio: MLP form: initial fraction of previous-layer units chosen as children (at least one).
            The authors' code uses 0.1 with 100 units; since a ReLU unit is zero about half the time and a
            unit is on only when all its children are, ten children leave the deeper layers almost always
            off, so the default is 0.03 (three children of 100).
        initial_tau: MLP form: initial ``|tau|``.
    """

    def __init__(
        self,
        input_shape: int | Sequence[int],
        classes: int,
        *,
        layers: int = 3,
        hidden: int = 100,
        channels: int = 32,
        stem: bool = True,
        gamma: float | None = None,
        beta: float = 10.0,
        act_ratio: float = 0.03,
        initial_tau: float = 1.0,
    ) -> None:
        super().__init__()
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        if len(shape) not in (1, 3):
            raise ValueError(f"input_shape must be (F,) for tabular data or (C, H, W) for images, got {input_shape!r}")
        for s in shape:
            _positive_int(s, "input_shape entry")
        _positive_int(classes, "classes")
        _positive_int(layers, "layers")
        _positive_int(hidden, "hidden")
        _positive_int(channels, "channels")
        if not isinstance(stem, bool):
            raise ValueError(f"stem must be True or False, got {stem!r}")
        self.form = "mlp" if len(shape) == 1 else "cnn"
        gamma = _positive_float(gamma if gamma is not None else (100.0 if self.form == "mlp" else 1.0), "gamma")
        beta = _positive_float(beta, "beta")
        if isinstance(act_ratio, bool) or not isinstance(act_ratio, (int, float)) or not 0 < act_ratio <= 1:
            raise ValueError(f"act_ratio must be in (0, 1], got {act_ratio!r}")
        initial_tau = _positive_float(initial_tau, "initial_tau")
        self.input_shape = shape
        self.classes = classes
        self.config: dict[str, Any] = {
            "input_shape": list(shape), "classes": classes, "layers": layers, "hidden": hidden,
            "channels": channels, "stem": stem, "gamma": gamma, "beta": beta, "act_ratio": act_ratio,
            "initial_tau": initial_tau,
        }
        self.stem: nn.Module | None = None
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        if self.form == "mlp":
            self.variable_shape: tuple[int, ...] = shape
            width = shape[0]
            for _ in range(layers):
                self.blocks.append(HarsanyiLinear(width, hidden, gamma, beta, act_ratio, initial_tau))
                head = nn.Linear(hidden, classes, bias=False)
                nn.init.xavier_uniform_(head.weight)
                self.heads.append(head)
                width = hidden
            self.register_buffer("baseline", torch.zeros(shape))
        else:
            c, h, w = shape
            if stem:
                if h < 2 or w < 2:
                    raise ValueError(f"images of size {h}x{w} are too small for the pooling stem; use stem=False")
                self.stem = nn.Sequential(nn.Conv2d(c, channels, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.ReLU())
                nn.init.kaiming_normal_(self.stem[0].weight, mode="fan_out", nonlinearity="relu")
                h, w, c = h // 2, w // 2, channels
            else:
                self.register_buffer("baseline", torch.zeros(shape))
            self.variable_shape = (h, w)
            for _ in range(layers):
                self.blocks.append(HarsanyiConv(c, channels, h, w, gamma, beta))
                head = nn.Linear(channels * h * w, classes, bias=False)
                nn.init.normal_(head.weight, 0.0, 0.01)
                self.heads.append(head)
                c = channels
        self.variables = math.prod(self.variable_shape)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HarsanyiNet:
        """Rebuild an (untrained) net from :attr:`config` (for loading checkpoints)."""
        cfg = dict(config)
        return cls(cfg.pop("input_shape"), cfg.pop("classes"), **cfg)

    # --- the baseline ---------------------------------------------------------------------------
    def set_baseline(self, baseline: Tensor) -> HarsanyiNet:
        """Set the input-space baseline (MLP form and ``stem=False``): the value a masked variable takes."""
        if not hasattr(self, "baseline"):
            raise ValueError("with the convolutional stem the baseline is fixed: a zero feature vector in z^(0)")
        baseline = torch.as_tensor(baseline)
        if tuple(baseline.shape) != self.input_shape:
            raise ValueError(f"baseline must have shape {self.input_shape}, got {tuple(baseline.shape)}")
        self.baseline.copy_(baseline)
        return self

    # --- forward --------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input must have shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """``z^(0)``: ``(N, C0, V)``, one column per input variable; a masked variable is a zero column."""
        self._check_input(x)
        if self.stem is not None:
            return self.stem(x).flatten(2)
        z = x - self.baseline
        return z.unsqueeze(1) if self.form == "mlp" else z.flatten(2)

    def forward_features(self, z0: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Scores and the outputs ``z^(1..L)`` (each ``(N, C, V_l)``) from ``z^(0)``."""
        zs: list[Tensor] = []
        z = z0
        out = None
        for block, head in zip(self.blocks, self.heads):
            z = block(z)
            zs.append(z)
            y = head(z.flatten(1))
            out = y if out is None else out + y
        assert out is not None
        return out, zs

    def forward(self, x: Tensor, return_shapley: bool = False,
                target: int | Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Class scores ``(N, classes)``; with ``return_shapley=True`` also the Shapley values of ``target``.

        ``target``: a class index, or one per sample ``(N,)``; default the predicted class.
        """
        scores, zs = self.forward_features(self.features(x))
        if not return_shapley:
            return scores
        return scores, self.shapley_from_units(zs, self.resolve_target(scores, target))

    def shapley(self, x: Tensor, target: int | Tensor | None = None) -> Tensor:
        """The exact Shapley values alone (see :meth:`forward`)."""
        return self.forward(x, return_shapley=True, target=target)[1]

    def resolve_target(self, scores: Tensor, target: int | Tensor | None) -> Tensor:
        n = scores.shape[0]
        if target is None:
            return scores.detach().argmax(1)
        if isinstance(target, bool):
            raise ValueError(f"target must be a class index, got {target!r}")
        t = torch.as_tensor(target, device=scores.device)
        if t.is_floating_point() or t.dim() > 1:
            raise ValueError(f"target must be an int or a 1-d integer tensor, got {target!r}")
        t = t.long().expand(n) if t.dim() == 0 else t.long()
        if t.shape[0] != n:
            raise ValueError(f"target has {t.shape[0]} entries for {n} inputs")
        if bool(((t < 0) | (t >= self.classes)).any()):
            raise ValueError(f"target must lie in [0, {self.classes}), got {target!r}")
        return t

    # --- the decomposition ----------------------------------------------------------------------
    @torch.no_grad()
    def receptive_fields(self) -> list[Tensor]:
        """Per layer, the ``(V_l, V0)`` 0/1 matrix of each unit's receptive field over the input variables."""
        fields = []
        r: Tensor | None = None
        for block in self.blocks:
            c = block.child_matrix()
            r = c if r is None else (c @ r > 0).to(c.dtype)
            fields.append(r)
        return fields

    def unit_contributions(self, zs: Sequence[Tensor], target: Tensor) -> list[Tensor]:
        """Per layer, ``w_u z_u(x)`` for the target output: ``(N, V_l)`` (summed over a unit's channels)."""
        out = []
        for z, head in zip(zs, self.heads):
            w = head.weight[target].view(z.shape[0], *z.shape[1:])  # (N, C, V_l)
            out.append((w * z).sum(1))
        return out

    def harsanyi_interactions(self, x: Tensor, target: int | Tensor | None = None) -> dict[tuple[int, ...], Tensor]:
        """``{S: I(S)}`` (each ``(N,)``) for every non-empty receptive field ``S`` of a unit (Sec. 3.2)."""
        scores, zs = self.forward_features(self.features(x))
        t = self.resolve_target(scores, target)
        result: dict[tuple[int, ...], Tensor] = {}
        for a, r in zip(self.unit_contributions(zs, t), self.receptive_fields()):
            for u in range(r.shape[0]):
                key = tuple(int(i) for i in r[u].nonzero().flatten())
                if key:
                    result[key] = result[key] + a[:, u] if key in result else a[:, u]
        return result

    def shapley_from_units(self, zs: Sequence[Tensor], target: Tensor) -> Tensor:
        """``phi(i) = sum_u [i in R_u] w_u z_u / |R_u|`` (Sec. 3.2); shape ``(N, *variable_shape)``."""
        phi = None
        for a, r in zip(self.unit_contributions(zs, target), self.receptive_fields()):
            r = r.to(a.dtype)
            p = (a / r.sum(1).clamp_min(1.0)) @ r
            phi = p if phi is None else phi + p
        assert phi is not None
        return phi.view(-1, *self.variable_shape)

    def baseline_scores(self) -> Tensor:
        """Scores ``(1, classes)`` with every input variable masked (``z^(0) = 0``); zero without biases."""
        p = self.heads[0].weight
        c0 = self.blocks[0].weight.shape[1] if self.form == "cnn" else 1
        return self.forward_features(torch.zeros(1, c0, self.variables, dtype=p.dtype, device=p.device))[0]
