"""Zeroth-order SPSA with regenerated perturbations (MeZO / BAFFLE): gradients from loss values only."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.batches import Inputs, call_model, logits_of
from ..forward_only.directions import Directions, accumulate_directions, draw_seeds, flat_view
from ..forward_only.forward_mode import BATCHED_LIMIT, functional_call
from ..forward_only.lowrank import LowRank, Plan, plan
from .base import (
    LossFn,
    NonFiniteError,
    SeedScalarRule,
    check_finite,
    check_int,
    check_positive,
    register,
    trainable_parameters,
)

DIFFERENCES = ("central", "forward")
PERTURBATIONS = ("full", "lowrank")


@register
class ZerothOrderSPSA(SeedScalarRule):
    """Simultaneous-perturbation stochastic approximation (Spall 1992) in the memory-efficient form of
    MeZO (Malladi et al. 2023, Algorithm 1) and BAFFLE (Feng et al. 2023, Sec. 3, one-sided differences).

    For each of ``K = directions`` seeds, the perturbation ``z`` over all trained parameters is
    regenerated from the seed whenever it is needed, never stored, and applied in place chunk by chunk
    (no temporary beyond one chunk of :data:`~forwardlearn.forward_only.directions.CHUNK` elements):

    - ``central``: ``s = (L(theta + eps z) - L(theta - eps z)) / (2 eps)``: two forwards per direction;
    - ``forward`` (BAFFLE): ``s = (L(theta + eps z) - L(theta)) / eps``: one forward per direction plus
      one shared unperturbed forward.

    The estimate is ``g = (1/K) sum_k s_k z_k`` (unbiased for the gradient of the loss smoothed along
    ``z`` as ``eps -> 0``). All forward passes run under ``torch.no_grad()``. Small models (``K`` x the
    number of weights up to ``BATCHED_LIMIT``, ``K > 1``) evaluate the ``K`` perturbed copies in one
    ``vmap``-ed pass instead of perturbing in place: same seeds and directions, scalars equal up to
    rounding; the in-place, one-chunk-memory path is the one used for large models.

    Seed-and-scalar API (for distributed/federated training and replay logs):

    - ``estimate(model, inputs, targets) -> (seeds, scalars, loss)``: ``K`` integer seeds drawn from the
      rule's own stream and the float64 scalars ``s_k`` (shape ``(K,)``); touches no ``.grad`` and puts
      the weights back (up to the rounding of ``+eps z - eps z``, a few ulps).
    - ``apply(model, seeds, scalars)``: ``p.grad += mean_k s_k z_k``, each ``z_k`` regenerated
      bit-identically from its seed (same machine and torch build).
    - ``fused_apply(model, seeds, scalars, lr, weight_decay=0.0)``: the SGD update
      ``p <- p - lr (mean_k s_k z_k + weight_decay p)`` in place, without ``.grad``.
    - ``fused_step(model, inputs, targets, lr, weight_decay=0.0) -> loss``: ``estimate`` + ``fused_apply``
      where putting the last perturbation back and the update share one sweep over the parameters
      (for ``K = 1``: two forwards + perturb, perturb back, restore-and-update). Training memory is
      inference memory plus one chunk.
    - ``grads = estimate + apply`` (then any ``torch.optim`` optimizer).

    ``perturbation="lowrank"`` (LOZO, Chen et al. 2024, Sec. 3; SubZero, Yu et al. 2024, Sec. 4): every
    weight matrix of an ``nn.Linear``/``nn.Conv2d`` (a kernel read as ``out x in kh kw``) is perturbed by
    ``Z = U V^T / sqrt(rank)`` with ``U``, ``V`` of the chosen distribution drawn from the direction's seed,
    its bias by a full vector; other parameters (norms, embeddings, weights shared between modules) keep
    the full perturbation. ``E[vec Z vec Z^T] = I`` as for the full perturbation, so the estimate is unbiased
    in the same sense, with the variance of correlated entries. The perturbed forward never writes a
    layer's parameters: a forward hook adds ``eps (U (V^T x) / sqrt(r) + z_b)`` to the layer's output
    (:mod:`forwardlearn.forward_only.lowrank`), and the update is one rank-``K r`` ``addmm_`` per matrix with the
    weight decay folded in, so a fused step is two forwards plus one pass over the weights (the full
    perturbation: two forwards plus three sweeps of random numbers). Small models take the ``vmap`` path
    below with the same directions formed densely (scalars equal up to rounding).

    ``loss`` returned: central, the mean of ``(L+ + L-)/2`` over directions (``L(theta) + O(eps^2)``);
    forward, the unperturbed loss.

    Args:
        directions: perturbations per step ``K`` (default 32, tuned for ``digits``; MeZO uses 1).
        eps: perturbation size.
        difference: ``central`` or ``forward``.
        distribution: ``rademacher`` (default, SPSA's symmetric Bernoulli) or ``gaussian`` (MeZO's).
        perturbation: ``full`` (default: every weight perturbed, MeZO) or ``lowrank`` (see above).
        rank: ``r`` of the low-rank perturbation (default 1; only with ``perturbation="lowrank"``).
    """

    name: ClassVar[str] = "zo_spsa"
    backward: ClassVar[str] = "none"
    description: ClassVar[str] = "zeroth-order SPSA: loss differences along seeded random perturbations (MeZO)"
    paper: ClassVar[str] = ("Malladi et al. 2023, Fine-Tuning Language Models with Just Forward Passes (MeZO); "
                            "Feng et al. 2023, Does Federated Learning Really Need Backpropagation? (BAFFLE)")
    #: digits: the variance grows with the number of weights, hence a narrow net and K = 32
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-2, "epochs": 20, "batch_size": 64, "hidden": [16], "model": "mlp",
    }
    forward_only: ClassVar[bool] = True
    supports_fused: ClassVar[bool] = True

    def __init__(self, directions: int = 32, eps: float = 1e-3, difference: str = "central",
                 distribution: str = "rademacher", perturbation: str = "full", rank: int | None = None,
                 loss: LossFn | None = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.directions = check_int(directions, "directions")
        self.eps = check_positive(eps, "eps")
        if difference not in DIFFERENCES:
            raise ValueError(f"difference must be one of {', '.join(DIFFERENCES)}, got {difference!r}")
        self.difference = difference
        self.distribution = distribution
        self._dirs = Directions(distribution)
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}")
        if rank is not None and perturbation != "lowrank":
            raise ValueError(f"rank applies only to perturbation='lowrank', got rank={rank!r} with {perturbation!r}")
        self.perturbation = perturbation
        self.rank = check_int(1 if rank is None else rank, "rank")
        self._lowrank = LowRank(distribution, self.rank) if perturbation == "lowrank" else None

    # --- internals ---------------------------------------------------------------------------------
    def _split(self, model: nn.Module) -> tuple[list[nn.Parameter], Plan | None, list[Tensor]]:
        """The trained parameters, the low-rank plan (``None`` for full perturbations) and the flat views of
        the parameters perturbed in place (all of them, or the low-rank plan's ``rest``)."""
        params = trainable_parameters(model)
        pl = plan(model, params) if self._lowrank is not None else None
        rest = range(len(params)) if pl is None else pl.rest
        return params, pl, [flat_view(params[i], f"parameter {i}") for i in rest]

    def _flats(self, model: nn.Module) -> list[Tensor]:
        return self._split(model)[2]

    def _inside(self, pl: Plan | None, params: list[nn.Parameter], seed: int,
                alpha: float) -> AbstractContextManager[None]:
        """The low-rank layers' perturbation ``alpha Z`` (a forward hook) while the block runs."""
        if pl is None or self._lowrank is None:
            return nullcontext()
        return self._lowrank.perturbed(pl, params, seed, alpha)

    def _perturb(self, flats: list[Tensor], seed: int, alpha: float) -> None:
        if flats:
            self._dirs.add_(flats, seed, alpha)

    @torch.no_grad()
    def _loss(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        return float(self.loss(logits_of(call_model(model, inputs)), targets))

    @torch.no_grad()
    def _estimate(self, model: nn.Module, inputs: Tensor, targets: Tensor,
                  defer_last: bool) -> tuple[list[int], Tensor, float, tuple[int, float] | None]:
        """Like :meth:`estimate`; with ``defer_last`` the last perturbation is left on the weights and
        returned as ``(seed, alpha)`` still to add."""
        params, pl, flats = self._split(model)
        seeds = draw_seeds(self.generator("cpu"), self.directions)
        scalars = torch.empty(len(seeds), dtype=torch.float64)
        eps = self.eps
        if len(seeds) > 1 and len(seeds) * sum(p.numel() for p in params) <= BATCHED_LIMIT:
            try:
                loss = self._batched(model, inputs, targets, seeds, scalars)
                return seeds, scalars, loss, None
            except NonFiniteError:
                raise
            except (RuntimeError, NotImplementedError):  # e.g. a layer vmap cannot batch: go in place
                pass
        base = self._loss(model, inputs, targets) if self.difference == "forward" else 0.0
        losses = []
        pending: tuple[int, float] | None = None
        try:
            for k, s in enumerate(seeds):
                self._perturb(flats, s, eps)
                pending = (s, -eps)
                with self._inside(pl, params, s, eps):
                    plus = self._loss(model, inputs, targets)
                if self.difference == "central":
                    self._perturb(flats, s, -2 * eps)
                    pending = (s, eps)
                    with self._inside(pl, params, s, -eps):
                        minus = self._loss(model, inputs, targets)
                    scalars[k] = (plus - minus) / (2 * eps)
                    losses.append(0.5 * (plus + minus))
                else:
                    scalars[k] = (plus - base) / eps
                if not (defer_last and k == len(seeds) - 1):
                    self._perturb(flats, *pending)
                    pending = None
        except BaseException:
            if pending is not None:
                self._perturb(flats, *pending)
            raise
        loss = sum(losses) / len(losses) if losses else base
        if not (torch.isfinite(scalars).all() and torch.isfinite(torch.tensor(loss))):
            if pending is not None:
                self._perturb(flats, *pending)
            check_finite(loss, "loss")
            check_finite(scalars.sum(), "loss difference")
        return seeds, scalars, loss, pending

    def _batched(self, model: nn.Module, inputs: Tensor, targets: Tensor, seeds: list[int], scalars: Tensor) -> float:
        """Small models: all ``K`` perturbed copies of the weights evaluated in one ``vmap``-ed forward pass.

        The weights are never touched (the copies are ``theta +- eps z_k``, ``K`` x the weights in memory,
        used only below :data:`~forwardlearn.forward_only.forward_mode.BATCHED_LIMIT`)."""
        params = trainable_parameters(model)
        names = {id(p): n for n, p in model.named_parameters()}
        keys = [names[id(p)] for p in params]
        numels = [p.numel() for p in params]
        z = tuple(torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=p.device) for p in params)
        _, pl, _ = self._split(model)
        rest = list(range(len(params))) if pl is None else pl.rest
        for k, s in enumerate(seeds):
            for i, a, b, piece in self._dirs.pieces(s, [numels[j] for j in rest], params[0].device):
                z[rest[i]][k].view(-1)[a:b].copy_(piece)
        if pl is not None and self._lowrank is not None:
            for l, layer in enumerate(pl.layers):  # Z_k = U_k V_k^T / sqrt(r) for all k at once
                u, v, zb = self._lowrank.stacked(seeds, l, layer, params[layer.weight])
                torch.bmm(u, v.transpose(1, 2), out=z[layer.weight].view(len(seeds), layer.out, layer.inp))
                if zb is not None and layer.bias is not None:
                    z[layer.bias].copy_(zb)

        def loss_at(*ws: Tensor) -> Tensor:
            return self.loss(logits_of(functional_call(model, dict(zip(keys, ws)), inputs)), targets)

        batched = torch.func.vmap(loss_at)
        eps = self.eps
        plus = batched(*(p.detach() + eps * zi for p, zi in zip(params, z))).double().cpu()
        if self.difference == "central":
            minus = batched(*(p.detach() - eps * zi for p, zi in zip(params, z))).double().cpu()
            scalars.copy_((plus - minus) / (2 * eps))
            loss = float((0.5 * (plus + minus)).mean())
        else:
            loss = self._loss(model, inputs, targets)
            scalars.copy_((plus - loss) / eps)
        if not (torch.isfinite(scalars).all() and torch.isfinite(torch.tensor(loss))):
            check_finite(loss, "loss")
            check_finite(scalars.sum(), "loss difference")
        return loss

    @torch.no_grad()
    def _update(self, model: nn.Module, seeds: list[int], scalars: Tensor, lr: float, weight_decay: float,
                pending: tuple[int, float] | None) -> None:
        """One sweep per parameter: add ``pending`` back, then ``p <- (1 - lr wd) p - lr mean_k s_k z_k``."""
        if len(seeds) != len(scalars):
            raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
        decay = 1.0 - lr * weight_decay
        coefs = [-lr * float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
        terms = list(zip(seeds, coefs))
        if pending is not None:
            ps, pa = pending
            if terms and terms[-1][0] == ps:
                terms[-1] = (ps, terms[-1][1] + pa * decay)
            else:
                terms.append((ps, pa * decay))
        params, pl, flats = self._split(model)
        self._dirs.add_terms_(flats, terms, decay)
        if pl is not None and self._lowrank is not None:
            self._lowrank.add_(pl, [p.detach() for p in params], list(zip(seeds, coefs)), decay)

    # --- the seed-and-scalar API ---------------------------------------------------------------------
    def estimate(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[list[int], Tensor, float]:
        """``(seeds, scalars, loss)`` for ``K`` seeded perturbations; weights restored, no ``.grad``."""
        seeds, scalars, loss, _ = self._estimate(model, inputs, targets, defer_last=False)
        return seeds, scalars, loss

    def apply(self, model: nn.Module, seeds: list[int], scalars: Tensor) -> None:
        """Accumulate ``mean_k scalars[k] * z_k`` into ``.grad`` (``z_k`` regenerated from ``seeds[k]``)."""
        params, pl, _ = self._split(model)
        scalars = torch.as_tensor(scalars)
        if pl is None or self._lowrank is None:
            accumulate_directions(params, self._dirs, list(seeds), scalars)
            return
        accumulate_directions([params[i] for i in pl.rest], self._dirs, list(seeds), scalars)
        if not seeds:
            return
        coefs = [float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
        fresh = [p.grad is None for p in params]
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        grads = [flat_view(p.grad, f"the gradient of parameter {i}").view_as(p) for i, p in enumerate(params)]
        self._lowrank.add_(pl, grads, list(zip(seeds, coefs)), overwrite=fresh)

    def fused_apply(self, model: nn.Module, seeds: list[int], scalars: Tensor, lr: float,
                    weight_decay: float = 0.0) -> None:
        """In-place SGD step ``p <- p - lr (mean_k scalars[k] z_k + weight_decay p)``; no ``.grad``."""
        check_positive(lr, "lr")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self._update(model, list(seeds), torch.as_tensor(scalars), lr, weight_decay, None)

    def fused_step(self, model: nn.Module, inputs: Tensor, targets: Tensor, lr: float,
                   weight_decay: float = 0.0) -> float:
        """``estimate`` + ``fused_apply`` with the last restore folded into the update; returns the loss."""
        check_positive(lr, "lr")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        seeds, scalars, loss, pending = self._estimate(model, inputs, targets, defer_last=True)
        self._update(model, seeds, scalars, lr, weight_decay, pending)
        self.steps += 1
        return loss

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        seeds, scalars, loss = self.estimate(model, inputs, targets)
        self.apply(model, seeds, scalars)
        self.steps += 1
        return loss
