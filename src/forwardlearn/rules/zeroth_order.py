"""Zeroth-order SPSA with regenerated perturbations (MeZO / BAFFLE): gradients from loss values only.

``zo_spsa`` is a composition of the forward-only parts (:mod:`forwardlearn.forward_only`): a weight sampler
(``full`` or ``lowrank``) x :class:`~forwardlearn.forward_only.estimators.FiniteDifference` x the applicator
``ToGrad`` (``grads``/``apply``) or ``FusedSGD`` (``fused_apply``/``fused_step``), run by the shared ``Evaluator``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.batches import Inputs
from ..forward_only.directions import draw_seeds
from ..forward_only.estimators import DIFFERENCES, FiniteDifference, FusedSGD, ToGrad
from ..forward_only.evaluator import Evaluator
from ..forward_only.forward_mode import BATCHED_LIMIT
from ..forward_only.samplers import Frame, sampler
from .base import LossFn, SeedScalarRule, check_int, register

PERTURBATIONS = ("full", "lowrank")
__all__ = ["DIFFERENCES", "PERTURBATIONS", "ZerothOrderSPSA"]


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
        self._estimator = FiniteDifference(eps, difference)
        self.eps = self._estimator.eps
        self.difference = difference
        self.distribution = distribution
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}")
        if rank is not None and perturbation != "lowrank":
            raise ValueError(f"rank applies only to perturbation='lowrank', got rank={rank!r} with {perturbation!r}")
        self.perturbation = perturbation
        self.rank = check_int(1 if rank is None else rank, "rank")
        self._sampler = sampler(distribution, perturbation, self.rank)
        self._dirs = self._sampler.directions

    def _frame(self, model: nn.Module) -> Frame:
        """The trained parameters as the sampler lays them out; those perturbed in place must be contiguous."""
        frame = self._sampler.frame(model)
        frame.flats  # noqa: B018  (flat views made now: a non-contiguous parameter is an error before any work)
        return frame

    def _estimate(self, model: nn.Module, inputs: Inputs, targets: Tensor,
                  defer_last: bool) -> tuple[list[int], Tensor, float, tuple[int, float] | None, Frame]:
        frame = self._frame(model)
        seeds = draw_seeds(self.generator("cpu"), self.directions)
        scalars, loss, pending = self._estimator.scalars(Evaluator(self.loss), model, inputs, targets, self._sampler,
                                                         frame, seeds, BATCHED_LIMIT, defer_last)
        return seeds, scalars, loss, pending, frame

    # --- the seed-and-scalar API ---------------------------------------------------------------------
    def estimate(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> tuple[list[int], Tensor, float]:
        """``(seeds, scalars, loss)`` for ``K`` seeded perturbations; weights restored, no ``.grad``."""
        seeds, scalars, loss, _, _ = self._estimate(model, inputs, targets, defer_last=False)
        return seeds, scalars, loss

    def apply(self, model: nn.Module, seeds: list[int], scalars: Tensor) -> None:
        """Accumulate ``mean_k scalars[k] * z_k`` into ``.grad`` (``z_k`` regenerated from ``seeds[k]``)."""
        ToGrad().apply(self._sampler, self._frame(model), list(seeds), scalars)

    def fused_apply(self, model: nn.Module, seeds: list[int], scalars: Tensor, lr: float,
                    weight_decay: float = 0.0) -> None:
        """In-place SGD step ``p <- p - lr (mean_k scalars[k] z_k + weight_decay p)``; no ``.grad``."""
        step = FusedSGD(lr, weight_decay)
        step.apply(self._sampler, self._frame(model), list(seeds), torch.as_tensor(scalars))

    def fused_step(self, model: nn.Module, inputs: Inputs, targets: Tensor, lr: float,
                   weight_decay: float = 0.0) -> float:
        """``estimate`` + ``fused_apply`` with the last restore folded into the update; returns the loss."""
        step = FusedSGD(lr, weight_decay)
        seeds, scalars, loss, pending, frame = self._estimate(model, inputs, targets, defer_last=True)
        step.apply(self._sampler, frame, seeds, scalars, restore=pending)
        self.steps += 1
        return loss

    def grads(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        seeds, scalars, loss = self.estimate(model, inputs, targets)
        self.apply(model, seeds, scalars)
        self.steps += 1
        return loss
