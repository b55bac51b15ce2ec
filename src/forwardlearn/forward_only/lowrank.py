"""Low-rank seeded perturbations applied inside the layers' forward passes (the low-rank sampler).

Every weight matrix ``W`` (``out x in``; a convolution kernel read as ``out x (in kh kw)``) of an
``nn.Linear``/``nn.Conv2d`` layer is perturbed by ``Z = U V^T / sqrt(r)`` with ``U`` (``out x r``) and
``V`` (``in x r``) of i.i.d. Rademacher or standard Gaussian entries drawn from the direction's seed; the
layer's bias by a full vector ``z_b``. Because ``E[U_ik U_jl] = delta_ij delta_kl`` (and likewise for
``V``), ``E[Z_ab Z_cd] = (1/r) sum_k delta_ac delta_bd = delta_ac delta_bd``: ``E[vec Z vec Z^T] = I``, the
same second moment as a full perturbation, so every estimator that is unbiased for one stays unbiased.

The perturbed layer never writes its weight: a forward hook adds
``alpha (U (V^T x) / sqrt(r) + z_b)`` to the layer's output (a convolution: the input convolved with the
``r`` kernels ``V``, then mixed by ``U``), ``O(batch (in + out) r)`` work instead of a sweep over ``W``.
Updates are rank-``K r`` products added in place (``addmm_``).

Low-rank perturbations for zeroth-order training: LOZO (Chen et al. 2024, Enhancing Zeroth-order
Fine-tuning for Language Models with Low-rank Structures, Sec. 3, the low-rank gradient estimator
``(L(W + eps U V^T) - L(W - eps U V^T)) / (2 eps) U V^T / r``) and SubZero (Yu et al. 2024, Random Subspace
Zeroth-Order Optimization, Sec. 4, layer-wise low-rank perturbations).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .directions import DISTRIBUTIONS, mix_seed

#: generator index of layer ``l``'s factors: far above any chunk index of :class:`~.directions.Directions`
_LAYER_BASE = 1 << 40
_DEFAULT_FORWARDS = (nn.Linear.forward, nn.Conv2d.forward)


@dataclass
class Layer:
    """One low-rank layer: its module, the indices of its weight (and bias) among the trained parameters."""

    module: nn.Module
    name: str
    weight: int
    bias: int | None
    out: int
    inp: int
    calls: int = field(default=0, compare=False)


@dataclass
class Plan:
    """Which trained parameters are perturbed through a layer's forward (``layers``) and which in place
    (``rest``: parameters outside a plain ``Linear``/``Conv2d``, or shared between modules)."""

    layers: list[Layer]
    rest: list[int]


def _inside_attention(model: nn.Module) -> set[int]:
    """Modules inside an ``nn.MultiheadAttention``: it reads its projections' weights without calling them."""
    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            inside.update(id(s) for s in m.modules())
    return inside


def plan(model: nn.Module, params: list[nn.Parameter]) -> Plan:
    """Sort the trained ``params`` (in this order) into low-rank layers and the rest.

    A layer qualifies when it is an ``nn.Linear`` or an ungrouped ``nn.Conv2d`` whose ``forward`` is
    the stock one, it is not inside an ``nn.MultiheadAttention`` and no other module holds its weight
    (a weight tied to an embedding is used outside the layer's forward and is perturbed in place)."""
    index = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    skip = _inside_attention(model)
    layers: list[Layer] = []
    taken: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).forward not in _DEFAULT_FORWARDS or id(m) in skip:
            continue
        w = m._parameters.get("weight")
        if w is None or id(w) not in index or owners[id(w)] != 1 or id(w) in taken:
            continue
        if not w.is_contiguous() or (isinstance(m, nn.Conv2d) and m.groups != 1):
            continue
        b = m._parameters.get("bias")
        bi = index[id(b)] if b is not None and id(b) in index and owners[id(b)] == 1 else None
        layers.append(Layer(m, name, index[id(w)], bi, w.shape[0], w[0].numel()))
        taken.add(id(w))
        if bi is not None:
            taken.add(id(b))
    rest = [i for i, p in enumerate(params) if id(p) not in taken]
    return Plan(layers, rest)


class LowRank:
    """Low-rank directions regenerated from integer seeds (see the module docstring).

    Layer ``l``'s factors for direction ``seed`` come from a generator seeded with
    ``mix_seed(seed, 2**40 + l)``, drawn as one vector ``[U | V | z_b]`` (float32, then cast to the
    weight's dtype): the same seed gives bit-identical factors on the same machine and torch build.
    """

    def __init__(self, distribution: str = "rademacher", rank: int = 1) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution
        self.rank = rank
        self._gens: dict[torch.device, torch.Generator] = {}

    def stacked(self, seeds: list[int], l: int, layer: Layer,
                like: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Layer ``l``'s factors for every seed, stacked: ``U / sqrt(r)`` ``(K, out, r)``, ``V`` ``(K, in, r)`` and
        ``z_b`` ``(K, out)`` (``None`` without a bias), in ``like``'s dtype and device."""
        device = like.device
        g = self._gens.get(device)
        if g is None:
            g = self._gens[device] = torch.Generator(device=device)
        r, o, i = self.rank, layer.out, layer.inp
        n = (o + i) * r + (o if layer.bias is not None else 0)
        z = torch.empty(len(seeds), n, device=device)  # row k: [U (o r) | V (i r) | z_b (o)] of seeds[k]
        for k, seed in enumerate(seeds):
            g.manual_seed(mix_seed(seed, _LAYER_BASE + l))
            if self.distribution == "gaussian":
                z[k].normal_(generator=g)
            else:
                z[k].bernoulli_(0.5, generator=g)
        if self.distribution != "gaussian":
            z.mul_(2.0).sub_(1.0)
        z = z.to(like.dtype)
        u = z[:, : o * r].view(-1, o, r).mul_(1.0 / math.sqrt(r))
        v = z[:, o * r : (o + i) * r].view(-1, i, r)
        zb = z[:, (o + i) * r :] if layer.bias is not None else None
        return u, v, zb

    def factors(self, seed: int, l: int, layer: Layer, like: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(U / sqrt(r), V, z_b)`` of layer ``l`` for direction ``seed`` (``z_b`` is ``None`` without a bias)."""
        u, v, zb = self.stacked([seed], l, layer, like)
        return u[0], v[0], None if zb is None else zb[0]

    @contextmanager
    def perturbed(self, p: Plan, params: list[nn.Parameter], seed: int, alpha: float) -> Iterator[None]:
        """Inside the block, every planned layer computes its output at ``W + alpha Z`` (and ``b + alpha z_b``)
        through a forward hook; no parameter is written. Raises ``ValueError`` on exit if a planned layer's
        forward never ran (its weight was then used some other way, and the perturbation would be lost)."""
        handles = []
        for l, layer in enumerate(p.layers):
            u, v, zb = self.factors(seed, l, layer, params[layer.weight])
            layer.calls = 0
            handles.append(layer.module.register_forward_hook(_hook(layer, u, v, zb, alpha), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        missed = [layer.name for layer in p.layers if layer.calls == 0]
        if missed:
            raise ValueError(f"perturbation='lowrank': the forward of layer {missed[0]!r} did not run during the "
                             "model's forward, so its weight cannot be perturbed inside it; use perturbation='full'")

    def add_(self, p: Plan, params: list[Tensor], terms: list[tuple[int, float]], decay: float = 1.0,
             overwrite: list[bool] | None = None) -> None:
        """``t <- decay t + sum_k alpha_k Z_k`` for the planned layers' weights (one ``addmm_`` of rank
        ``K r`` each) and ``+ sum_k alpha_k z_{b,k}`` for their biases; ``params[i]`` are the tensors to
        change (parameters or their gradients, in trained-parameter order). Where ``overwrite[i]`` the
        tensor is written, not added to (a fresh buffer: contents and ``decay`` ignored)."""
        fresh = overwrite or [False] * len(params)
        if not terms:
            return
        seeds = [sd for sd, _ in terms]
        for l, layer in enumerate(p.layers):
            w = params[layer.weight]
            u, v, zb = self.stacked(seeds, l, layer, w)
            a = torch.tensor([a for _, a in terms], dtype=w.dtype, device=w.device)
            u = (u * a.view(-1, 1, 1)).permute(1, 0, 2).reshape(layer.out, -1)  # (out, K r): alpha_k U_k side by side
            v = v.permute(1, 0, 2).reshape(layer.inp, -1)
            w2 = w.view(layer.out, layer.inp)
            if fresh[layer.weight]:
                torch.mm(u, v.T, out=w2)
            else:
                w2.addmm_(u, v.T, beta=decay)
            if layer.bias is not None and zb is not None:
                b = params[layer.bias]
                zsum = a @ zb
                if fresh[layer.bias]:
                    b.copy_(zsum)
                else:
                    if decay != 1.0:
                        b.mul_(decay)
                    b.add_(zsum)


def _hook(layer: Layer, u: Tensor, v: Tensor, zb: Tensor | None, alpha: float):  # noqa: ANN202
    conv = isinstance(layer.module, nn.Conv2d)
    kernels = v.T.reshape(v.shape[1], *layer.module.weight.shape[1:]) if conv else None
    ub = u if zb is None or conv else torch.cat([u, zb[:, None]], 1)  # Linear: the bias as one more column
    va = v * alpha

    def hook(m: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        layer.calls += 1
        x = args[0] if args else next(iter(kwargs.values()))  # the input, also when passed by keyword
        if conv:
            y = m._conv_forward(x, kernels, None).mul_(alpha)  # (B, r, H', W'): x against the r kernels V
            if out.is_contiguous() and out.dim() == 4:
                o3 = out.view(out.shape[0], layer.out, -1)
                o3.baddbmm_(u.expand(out.shape[0], -1, -1), y.view(y.shape[0], y.shape[1], -1))
            else:
                out = out + torch.einsum("or,brhw->bohw" if out.dim() == 4 else "or,rhw->ohw", u, y)
            if zb is not None:
                out.add_(zb.view(-1, 1, 1), alpha=alpha)
            return out
        x2 = x.reshape(-1, layer.inp)
        xv = x2 @ va  # (N, r): alpha times the input projected on V [then a column of alpha for the bias]
        if ub.shape[1] > va.shape[1]:
            xv = torch.cat([xv, xv.new_full((xv.shape[0], 1), alpha)], 1)
        if out.is_contiguous():  # one rank-(r + 1) product adds both alpha U V^T x / sqrt(r) and alpha z_b
            out.view(-1, layer.out).addmm_(xv, ub.T)
        else:
            out = out + (xv @ ub.T).view_as(out)
        return out

    return hook
