"""Forward gradients: the gradient estimated from directional derivatives computed by forward-mode AD.

- ``forward_gradient`` (Baydin et al. 2022): weight perturbation, ``g = (grad . v) v``;
- ``activity_forward_gradient`` (Ren et al. 2022): perturb every layer's output instead of its weights.

Both are compositions of the parts in :mod:`forwardlearn.forward_only`: ``forward_gradient`` = a weight sampler
(``full`` or ``rank1``) x :class:`~forwardlearn.forward_only.estimators.ForwardMode` x ``ToGrad``;
``activity_forward_gradient`` = ``UnitNoise`` x ``ActivityForwardMode`` x ``local_to_grad``; both run by the shared
``Evaluator``. ``local_forward_gradient`` (Fournier et al. 2023) is in :mod:`.local_forward_gradient`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec
from ..data.batches import Inputs
from ..forward_only.directions import draw_seeds
from ..forward_only.estimators import ActivityForwardMode, ForwardMode, ToGrad, local_to_grad
from ..forward_only.evaluator import Evaluator
from ..forward_only.forward_mode import BATCHED_LIMIT, TANGENTS, Tangent
from ..forward_only.local import perturbed_units
from ..forward_only.samplers import Frame, UnitNoise, sampler
from .base import LossFn, Rule, SeedScalarRule, check_int, register


@register
class ForwardGradient(SeedScalarRule):
    """Forward gradient, weight perturbation (Baydin et al. 2022, Sec. 3, Eq. 1 and Theorem 1).

    For ``K = directions`` tangents ``v_k`` over all trained parameters (``E[v v^T] = I``), one
    forward-mode AD pass each gives the directional derivative ``d_k = grad L . v_k`` (no backward
    pass); the estimate ``g = (1/K) sum_k d_k v_k`` is unbiased. Tangents are regenerated from
    per-direction integer seeds (:class:`Directions`); during the forward pass a layer's tangent
    exists only while that layer runs.

    ``tangent="rank1"`` draws every weight matrix's tangent as an outer product ``V = u r^T`` (``u``, ``r``
    of the chosen distribution; a convolution kernel is read as ``(out, in * kh * kw)``; biases keep a
    full tangent). ``E[V_ij V_kl] = E[u_i u_k] E[r_j r_l] = delta_ik delta_jl``, so ``E[v v^T] = I`` still
    holds and the estimate stays unbiased (Theorem 1 needs no more); with Rademacher factors every entry
    is +-1 as before, but entries of one matrix are correlated, which changes the variance (measure it
    with :func:`forwardlearn.diagnostics.gradient_alignment`). The gain is cost: ``h V^T = (h r) u^T`` is a
    rank-one update instead of a matrix product, and only ``O(rows + columns)`` random numbers per
    layer are drawn, so a step costs about two forward passes plus writing the gradient.

    Seed-and-scalar API (for distributed training and replay logs):

    - ``estimate(model, inputs, targets) -> (seeds, scalars, loss)``: ``K`` seeds drawn from the rule's
      stream, ``scalars[k] = d_k`` (float64, shape ``(K,)``); touches no ``.grad``, weights unchanged.
    - ``apply(model, seeds, scalars)``: ``p.grad += mean_k scalars[k] * v_k``, each ``v_k`` regenerated
      bit-identically from ``seeds[k]``.
    - ``grads = estimate + apply`` (with ``reuse_tangents``, full tangents, ``K = 1`` and no ``.grad`` yet:
      the same numbers from one pass that keeps each layer's tangent as its gradient buffer -- one sweep
      of random numbers instead of two, but the tangents and the activations then coexist at the peak).

    Small models (``K`` x the number of weights up to :data:`BATCHED_LIMIT`) run the ``K`` tangents in
    one ``vmap``-ed pass; larger ones one lazy pass per tangent.

    Args:
        directions: tangents per step ``K`` (default 32, tuned for ``digits``; the paper uses 1).
        distribution: ``rademacher`` (default; +-1, cheapest to draw) or ``gaussian`` (the paper's).
        tangent: ``full`` (default: i.i.d. entries, the paper's) or ``rank1`` (outer products, see above).
        reuse_tangents: trade a little peak memory for speed as described above (default off: lowest
            memory, the tangents live one layer at a time).
    """

    name: ClassVar[str] = "forward_gradient"
    backward: ClassVar[str] = "none"
    description: ClassVar[str] = "forward gradient: (grad . v) v from forward-mode AD along random weight tangents"
    paper: ClassVar[str] = "Baydin, Pearlmutter, Syme, Wood & Torr 2022, Gradients without Backpropagation"
    #: digits: the estimator's variance grows with the number of weights, hence a narrow net and K = 32
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-2, "epochs": 20, "batch_size": 64, "hidden": [16], "model": "mlp",
    }
    forward_only: ClassVar[bool] = True

    def __init__(self, directions: int = 32, distribution: str = "rademacher", tangent: str = "full",
                 reuse_tangents: bool = False, loss: LossFn | None = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.directions = check_int(directions, "directions")
        if not isinstance(reuse_tangents, bool):
            raise ValueError(f"reuse_tangents must be a bool, got {reuse_tangents!r}")
        if tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {', '.join(TANGENTS)}, got {tangent!r}")
        self.reuse_tangents = reuse_tangents
        self.tangent = tangent
        self.distribution = distribution
        self._sampler = sampler(distribution, tangent)
        self._dirs = self._sampler.directions
        self._estimator = ForwardMode()

    def _layout(self, params: list[nn.Parameter]) -> Frame:
        """The lengths of the random vectors a direction is made of, and which of them each parameter uses."""
        return self._sampler.frame(None, params)

    def _tangent(self, seed: int, layout: Frame, i: int, p: Tensor) -> Tangent:
        """Parameter ``i``'s tangent of direction ``seed`` (a :class:`RankOne` for ``rank1`` weights)."""
        return self._sampler.tangent_of(layout, seed)(i, p)

    def estimate(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> tuple[list[int], Tensor, float]:
        """``(seeds, scalars, loss)``: directional derivatives along ``K`` seeded tangents (see class doc)."""
        seeds = draw_seeds(self.generator("cpu"), self.directions)
        scalars, loss = self._estimator.scalars(Evaluator(self.loss), model, inputs, targets, self._sampler,
                                                self._sampler.frame(model), seeds, BATCHED_LIMIT)
        return seeds, scalars, loss

    def apply(self, model: nn.Module, seeds: list[int], scalars: Tensor) -> None:
        """Accumulate ``mean_k scalars[k] * v_k`` into ``.grad`` (``v_k`` regenerated from ``seeds[k]``)."""
        ToGrad().apply(self._sampler, self._sampler.frame(model), list(seeds), scalars)

    def grads(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        frame = self._sampler.frame(model)
        params = frame.params
        if (self.reuse_tangents and self.tangent == "full" and self.directions == 1 and params
                and all(p.grad is None for p in params)):
            (seed,) = draw_seeds(self.generator("cpu"), 1)
            loss = self._estimator.into_grad(Evaluator(self.loss), model, inputs, targets, self._sampler, frame, seed)
        else:
            seeds, scalars, loss = self.estimate(model, inputs, targets)
            self.apply(model, seeds, scalars)
        self.steps += 1
        return loss


@register
class ActivityForwardGradient(Rule):
    """Forward gradient with activity perturbation (Ren, Kornblith, Liao & Hinton 2022, Sec. 3, "activity
    perturbation"; the "activity" guess of Fournier et al. 2023).

    Every perturbed unit's output ``z_l`` gets a tangent ``u_l ~ N(0, I)`` per example, added to the
    tangent flowing in from earlier units; one forward-mode pass then gives, for each example ``n``,
    ``d_n = sum_l dL/dz_l[n] . u_l[n]`` (per-example directional derivatives of the batch loss, see
    :func:`per_example_directional`). ``d_n u_l[n]`` is an unbiased estimate of ``dL/dz_l[n]``, turned into
    the unit's parameter gradient locally (:func:`~forwardlearn.forward_only.local.local_grads`): for a
    ``Linear``/``Conv2d`` layer by its own formula ``sum_n (d_n u_l[n]) x_l[n]^T`` with its input ``x_l``
    (also for ``BatchNorm``/``LayerNorm``), for any other unit by the vector-Jacobian product of that unit
    alone (reverse mode inside the unit, never across units). The noise has the dimension of the
    activations, not of the weights: far lower variance than weight perturbation.

    Units: the blocks chosen by ``blocks`` (:func:`forwardlearn.blocks.select_blocks`; default every
    residual block and transformer layer, else every ``Linear``/``Conv2d``) plus every other module with
    trained parameters outside them (:func:`~forwardlearn.forward_only.local.perturbed_units`); on an MLP or
    CNN exactly its ``Linear``/``Conv2d`` layers, and the rule is then forward-only; a layer and the
    normalisation after it in one ``nn.Sequential`` are one unit, perturbed after the normalisation. The unit
    that produces the model's output gets the exact gradient of the loss (a derivative with respect to the
    output only, :func:`~forwardlearn.forward_only.local.output_gradient`) and its tangent is taken out of
    ``d_n``, as Ren et al. train their classifier heads by their exact local gradient: on ``rescnn`` the output's
    share of ``Var(d_n)`` was over 80 %. Under batch norm with batch statistics each example still uses its
    own ``d_n``: the other examples' share through the batch statistics is O(1/N) and is dropped, as in
    Ren et al.'s per-example estimates (the batch sum ``sum_n d_n``, unbiased, has N times the variance and
    left the residual CNN at chance). ``directions=K`` averages ``K`` independent passes (default 4, tuned for
    ``digits``; the paper uses 1).
    """

    name: ClassVar[str] = "activity_forward_gradient"
    backward: ClassVar[str] = "none"
    description: ClassVar[str] = "forward gradient with tangents on layer outputs, weights updated from local inputs"
    paper: ClassVar[str] = "Ren, Kornblith, Liao & Hinton 2022, Scaling Forward Gradient With Local Losses"
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 3e-3, "epochs": 20, "batch_size": 64, "hidden": [64], "model": "mlp",
    }
    forward_only: ClassVar[bool] = True

    def __init__(self, directions: int = 4, blocks: BlockSpec = None, loss: LossFn | None = None,
                 seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.directions = check_int(directions, "directions")
        self.blocks = check_block_spec(blocks)

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        units = perturbed_units(model, self.name, self.blocks)
        noise = UnitNoise(self.generator(inputs.device))
        estimator, evaluator = ActivityForwardMode(), Evaluator(self.loss)
        loss = float("nan")
        for _ in range(self.directions):
            estimate = estimator.estimate(evaluator, model, inputs, targets, units, noise, self.directions, self.name)
            local_to_grad(estimate)  # one unit at a time, its inputs and tangents freed as we go
            loss = estimate.loss
        self.steps += 1
        return loss
