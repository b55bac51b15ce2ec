"""Samplers: seeded random directions over the trained weights, and Gaussian noise on unit outputs.

A weight-space sampler turns an integer seed into a direction ``v`` over all trained parameters with
``E[v] = 0`` and ``E[v v^T] = I`` (what every estimator's unbiasedness needs). Nothing is stored: the seed
regenerates ``v`` (chunk by chunk, or factor by factor) on any process, bit for bit. Three tangent kinds:

- :class:`FullSampler` (``tangent="full"``): i.i.d. entries over the concatenated parameters
  (:class:`~forwardlearn.forward_only.directions.Directions`);
- :class:`LowRankSampler` (``tangent="lowrank"``): ``Z = U V^T / sqrt(r)`` per ``Linear``/``Conv2d`` weight,
  applied inside the layer's forward by a hook, the other parameters full
  (:mod:`~forwardlearn.forward_only.lowrank`; LOZO, Chen et al. 2024, Sec. 3);
- :class:`RankOneSampler` (``tangent="rank1"``): ``u r^T`` per weight matrix, drawn by :class:`Directions` over
  the factors, biases full (kept factored for forward mode, :class:`~.forward_mode.RankOne`).

Every method takes a :class:`Frame`: the model's trained parameters as the sampler lays them out, made once
per step by :meth:`Sampler.frame`. :class:`UnitNoise` is the activity-space sampler: i.i.d. Gaussian noise on
the outputs of perturbed units, drawn from a rule's generator in the order the units run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from ..rules.base import check_int, trainable_parameters
from .directions import DISTRIBUTIONS, Directions, flat_view
from .forward_mode import RankOne, Tangent
from .lowrank import LowRank, Plan, plan

#: the tangent kinds of :func:`sampler`
TANGENT_KINDS = ("full", "lowrank", "rank1")
Terms = list[tuple[int, float]]


@dataclass
class Frame:
    """One model's trained parameters as a sampler lays them out (made by :meth:`Sampler.frame`).

    ``numels``: the lengths of the random vectors a direction is cut into (``slots[i]``: those parameter ``i``
    uses); ``inplace``: the parameters perturbed by writing them (the rest only inside their layers' forward,
    ``plan``)."""

    params: list[nn.Parameter]
    numels: list[int]
    slots: list[list[int]]
    inplace: list[int]
    plan: Plan | None = None

    @cached_property
    def flats(self) -> list[Tensor]:
        """Flat views of the parameters perturbed in place (``ValueError`` for a non-contiguous one)."""
        return [flat_view(self.params[i], f"parameter {i}") for i in self.inplace]


def _params(model: nn.Module | None, params: list[nn.Parameter] | None) -> list[nn.Parameter]:
    if params is not None:
        return params
    if model is None:
        raise ValueError("a sampler's frame needs the model or its trained parameters")
    return trainable_parameters(model)


def merge_restore(terms: Terms, restore: tuple[int, float] | None, decay: float) -> Terms:
    """``terms`` plus a pending ``restore = (seed, alpha)`` scaled by ``decay`` (folded into the last term when it is
    the same direction), so putting a perturbation back and an update share one sweep."""
    if restore is None:
        return terms
    terms = list(terms)
    seed, alpha = restore
    if terms and terms[-1][0] == seed:
        terms[-1] = (seed, terms[-1][1] + alpha * decay)
    else:
        terms.append((seed, alpha * decay))
    return terms


class Sampler(ABC):
    """Seeded directions ``v`` over a model's trained parameters (``E[v v^T] = I``), regenerated from a seed.

    Args:
        distribution: ``rademacher`` (+-1, SPSA's symmetric Bernoulli, Spall 1992) or ``gaussian``.
    """

    tangent: str = ""

    def __init__(self, distribution: str = "rademacher") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution
        self.directions = Directions(distribution)

    @abstractmethod
    def frame(self, model: nn.Module | None, params: list[nn.Parameter] | None = None) -> Frame:
        """The layout of ``model``'s trained parameters (``params``: them, if already listed; the full and rank-one
        samplers then need no ``model``)."""

    @abstractmethod
    def dense(self, frame: Frame, seeds: list[int]) -> tuple[Tensor, ...]:
        """Every direction formed densely: one ``(K, *p.shape)`` tensor per parameter (small models, ``vmap``)."""

    @abstractmethod
    def add_(self, frame: Frame, tensors: list[Tensor], terms: Terms, decay: float = 1.0,
             overwrite: list[bool] | None = None, restore: tuple[int, float] | None = None,
             what: str = "parameter") -> None:
        """``tensors[i] <- decay tensors[i] + sum_k alpha_k v_k[i]`` in place for ``terms = [(seed_k, alpha_k)]``
        (``tensors``: parameter-shaped, contiguous, one per trained parameter: the weights or their ``.grad``).
        Where ``overwrite[i]`` the first term is written instead (a fresh buffer). ``restore`` is added to the
        parameters perturbed in place only (see :func:`merge_restore`); ``what`` names a tensor in errors."""

    def perturb_(self, frame: Frame, seed: int, alpha: float) -> None:
        """``p += alpha v`` for the parameters this sampler perturbs by writing them (in place, one chunk of memory)."""
        if frame.flats:
            self.directions.add_(frame.flats, seed, alpha)

    def inside(self, frame: Frame, seed: int, alpha: float) -> AbstractContextManager[None]:
        """The perturbation ``alpha v`` of the parameters perturbed inside their layers' forward while the block
        runs (nothing for samplers that perturb every parameter in place)."""
        return nullcontext()

    def tangent_of(self, frame: Frame, seed: int) -> Callable[[int, nn.Parameter], Tangent]:
        """``(i, p) -> v[i]`` for forward mode (:func:`~.forward_mode.jvp_loss`)."""
        raise ValueError(f"tangent={self.tangent!r} has no forward-mode tangent; use 'full' or 'rank1'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(distribution={self.distribution!r})"


class FullSampler(Sampler):
    """i.i.d. entries over the concatenation of all trained parameters (:class:`Directions`)."""

    tangent = "full"

    def frame(self, model: nn.Module | None, params: list[nn.Parameter] | None = None) -> Frame:
        params = _params(model, params)
        n = len(params)
        return Frame(params, [p.numel() for p in params], [[i] for i in range(n)], list(range(n)))

    def dense(self, frame: Frame, seeds: list[int]) -> tuple[Tensor, ...]:
        params = frame.params
        z = tuple(torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=p.device) for p in params)
        rest = frame.inplace
        for k, s in enumerate(seeds):
            for i, a, b, piece in self.directions.pieces(s, [frame.numels[j] for j in rest], params[0].device):
                z[rest[i]][k].view(-1)[a:b].copy_(piece)
        return z

    def add_(self, frame: Frame, tensors: list[Tensor], terms: Terms, decay: float = 1.0,
             overwrite: list[bool] | None = None, restore: tuple[int, float] | None = None,
             what: str = "parameter") -> None:
        flats = [flat_view(tensors[i], f"{what} {i}") for i in frame.inplace]
        fresh = None if overwrite is None else [overwrite[i] for i in frame.inplace]
        self.directions.add_terms_(flats, merge_restore(terms, restore, decay), decay, overwrite=fresh)

    def tangent_of(self, frame: Frame, seed: int) -> Callable[[int, nn.Parameter], Tangent]:
        return lambda i, p: self.directions.param(seed, frame.numels, frame.slots[i][0], p.detach())


class LowRankSampler(FullSampler):
    """``Z = U V^T / sqrt(rank)`` per plain ``Linear``/``Conv2d`` weight (its bias a full vector), applied inside the
    layer's forward; every other parameter full (:mod:`~forwardlearn.forward_only.lowrank`)."""

    tangent = "lowrank"

    def __init__(self, distribution: str = "rademacher", rank: int = 1) -> None:
        super().__init__(distribution)
        self.rank = check_int(rank, "rank")
        self.lowrank = LowRank(distribution, self.rank)

    def frame(self, model: nn.Module | None, params: list[nn.Parameter] | None = None) -> Frame:
        params = _params(model, params)
        pl = plan(model, params)
        return Frame(params, [p.numel() for p in params], [[i] for i in range(len(params))], list(pl.rest), pl)

    def dense(self, frame: Frame, seeds: list[int]) -> tuple[Tensor, ...]:
        z = super().dense(frame, seeds)
        params, pl = frame.params, frame.plan
        assert pl is not None
        for l, layer in enumerate(pl.layers):  # Z_k = U_k V_k^T / sqrt(r) for all k at once
            u, v, zb = self.lowrank.stacked(seeds, l, layer, params[layer.weight])
            torch.bmm(u, v.transpose(1, 2), out=z[layer.weight].view(len(seeds), layer.out, layer.inp))
            if zb is not None and layer.bias is not None:
                z[layer.bias].copy_(zb)
        return z

    def add_(self, frame: Frame, tensors: list[Tensor], terms: Terms, decay: float = 1.0,
             overwrite: list[bool] | None = None, restore: tuple[int, float] | None = None,
             what: str = "parameter") -> None:
        super().add_(frame, tensors, terms, decay, overwrite, restore, what)
        assert frame.plan is not None
        self.lowrank.add_(frame.plan, tensors, terms, decay, overwrite=overwrite)

    def inside(self, frame: Frame, seed: int, alpha: float) -> AbstractContextManager[None]:
        assert frame.plan is not None
        return self.lowrank.perturbed(frame.plan, frame.params, seed, alpha)

    def tangent_of(self, frame: Frame, seed: int) -> Callable[[int, nn.Parameter], Tangent]:
        return Sampler.tangent_of(self, frame, seed)

    def __repr__(self) -> str:
        return f"LowRankSampler(distribution={self.distribution!r}, rank={self.rank})"


class RankOneSampler(Sampler):
    """``u r^T`` per weight matrix (a kernel read as ``(out, in kh kw)``), ``u`` and ``r`` drawn by :class:`Directions`
    as two vectors of the direction's layout; 1-D parameters full. ``E[V_ij V_kl] = delta_ik delta_jl``."""

    tangent = "rank1"

    def frame(self, model: nn.Module | None, params: list[nn.Parameter] | None = None) -> Frame:
        params = _params(model, params)
        numels: list[int] = []
        slots: list[list[int]] = []
        for p in params:
            sizes = [p.shape[0], p.numel() // p.shape[0]] if p.dim() >= 2 else [p.numel()]
            slots.append(list(range(len(numels), len(numels) + len(sizes))))
            numels.extend(sizes)
        return Frame(params, numels, slots, list(range(len(params))))

    def tangent_of(self, frame: Frame, seed: int) -> Callable[[int, nn.Parameter], Tangent]:
        def of(i: int, p: Tensor) -> Tangent:
            numels, slots = frame.numels, frame.slots
            if len(slots[i]) == 1:
                return self.directions.param(seed, numels, slots[i][0], p.detach())
            j, k = slots[i]
            u = self.directions.param(seed, numels, j, torch.empty(numels[j], dtype=p.dtype, device=p.device))
            r = self.directions.param(seed, numels, k, torch.empty(numels[k], dtype=p.dtype, device=p.device))
            return RankOne(u, r)

        return of

    def dense(self, frame: Frame, seeds: list[int]) -> tuple[Tensor, ...]:
        params = frame.params
        z = tuple(torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=p.device) for p in params)
        for k, s in enumerate(seeds):
            of = self.tangent_of(frame, s)
            for i, p in enumerate(params):
                t = of(i, p)
                z[i][k].copy_(t.full(p) if isinstance(t, RankOne) else t)
        return z

    def perturb_(self, frame: Frame, seed: int, alpha: float) -> None:
        self.add_(frame, [p.detach() for p in frame.params], [(seed, alpha)])

    def add_(self, frame: Frame, tensors: list[Tensor], terms: Terms, decay: float = 1.0,
             overwrite: list[bool] | None = None, restore: tuple[int, float] | None = None,
             what: str = "parameter") -> None:
        terms = merge_restore(terms, restore, decay)
        fresh = overwrite or [False] * len(tensors)
        ofs = [self.tangent_of(frame, seed) for seed, _ in terms]
        for i, p in enumerate(frame.params):
            g = tensors[i]
            if decay != 1.0 and not fresh[i]:
                g.mul_(decay)
            for k, (of, (_, c)) in enumerate(zip(ofs, terms)):
                t = of(i, p)
                first = fresh[i] and k == 0  # the first term writes the buffer: no zero fill, no extra pass
                if isinstance(t, RankOne):
                    g2 = flat_view(g, f"{what} {i}").view(t.u.numel(), -1)
                    if first:
                        torch.mul(torch.outer(t.u, t.r), c, out=g2)
                    else:
                        g2.addr_(t.u, t.r, alpha=c)
                elif first:
                    torch.mul(t, c, out=g)
                else:
                    g.add_(t, alpha=c)


def sampler(distribution: str = "rademacher", tangent: str = "full", rank: int = 1) -> Sampler:
    """The weight-space sampler for ``tangent`` (``full``, ``lowrank`` of ``rank``, or ``rank1``)."""
    if tangent == "full":
        return FullSampler(distribution)
    if tangent == "lowrank":
        return LowRankSampler(distribution, rank)
    if tangent == "rank1":
        return RankOneSampler(distribution)
    raise ValueError(f"tangent must be one of {', '.join(TANGENT_KINDS)}, got {tangent!r}")


class UnitNoise:
    """Standard Gaussian noise on the outputs of perturbed units (activity perturbation), drawn from ``generator``
    in the order the units run; one generator stream replays the noise exactly.

    ``pairs`` (antithetic sampling): the batch holds ``K = directions`` copies of ``N`` examples; copy ``k + K/2``
    gets the negation of copy ``k``'s noise (:meth:`paired`)."""

    def __init__(self, generator: torch.Generator, directions: int = 1, pairs: bool = False) -> None:
        self.generator = generator
        self.directions = directions
        self.pairs = pairs

    def draw(self, like: Tensor) -> Tensor:
        """i.i.d. ``N(0, 1)`` noise shaped like ``like``."""
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)

    def paired(self, like: Tensor, examples: int) -> Tensor:
        """Noise for ``like`` (``K N`` rows: ``K`` copies of ``N`` examples), ``[e, -e]`` over the two halves."""
        k = self.directions
        half = torch.randn((k // 2, examples, *like.shape[1:]), generator=self.generator, dtype=like.dtype,
                           device=like.device)
        return torch.cat([half, -half]).view(like.shape)


__all__ = ["TANGENT_KINDS", "Frame", "FullSampler", "LowRankSampler", "RankOneSampler", "Sampler", "UnitNoise",
           "merge_restore", "sampler"]
