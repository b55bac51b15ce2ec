"""Gradient estimators composed from parts: sampler x estimator x variance reduction x applicator.

The parts (in the spirit of optax's small composable transformations):

- a **sampler** (:mod:`.samplers`): seeded weight directions (``full``/``lowrank``/``rank1``, Rademacher or
  Gaussian) or Gaussian noise on unit outputs (:class:`~.samplers.UnitNoise`);
- an **estimator** (here), which asks the one :class:`~.evaluator.Evaluator` to run the model:

  - :class:`FiniteDifference`: loss differences along weight directions (SPSA, Spall 1992; MeZO; BAFFLE);
  - :class:`ForwardMode`: directional derivatives along weight tangents (Baydin et al. 2022);
  - :class:`ActivityForwardMode`: directional derivatives along tangents on unit outputs (Ren et al. 2022);
  - :class:`ScoreFunction`: the likelihood ratio of Gaussian noise on unit outputs (Jiang et al. 2024);

- **variance reduction** (:mod:`.variance`): antithetic pairs, a leave-one-out baseline, or none;
- an **applicator**: :class:`ToGrad` (``p.grad += mean_k s_k v_k``, then any ``torch.optim``) or :class:`FusedSGD`
  (the SGD step in place, no ``.grad``) for weight-space estimates (seeds and scalars); :func:`local_to_grad` for
  unit-output estimates (each unit's local gradient, :mod:`.local`).

``zo_spsa``, ``forward_gradient``, ``activity_forward_gradient`` and ``ulr`` are named compositions of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..blocks import first_tensor, replace_first
from ..data.batches import Inputs
from ..rules.base import NonFiniteError, check_finite, check_positive
from .directions import flat_view
from .evaluator import Evaluator, fits_batched
from .forward_mode import math_attention
from .local import Saved, accumulate_layer, local_grads, output_gradient, output_unit
from .samplers import Frame, Sampler, UnitNoise
from .variance import Reduction

DIFFERENCES = ("central", "forward")


# --- weight-space estimators: seeds -> per-direction scalars ------------------------------------------------------
class FiniteDifference:
    """SPSA scalars from loss values only (Spall 1992; MeZO, Malladi et al. 2023, Algorithm 1; BAFFLE, Feng et al.
    2023, Sec. 3): ``central`` ``s = (L(theta + eps z) - L(theta - eps z)) / 2 eps`` (an antithetic pair), ``forward``
    ``s = (L(theta + eps z) - L(theta)) / eps`` (the exact baseline ``L(theta)``, one shared extra forward).

    Large models are perturbed in place (and inside their layers' forward for the low-rank sampler) and put back;
    ``K > 1`` directions of a small model (``K`` x weights <= ``batched_limit``) run as one ``vmap``-ed pass over
    dense copies instead (same directions; scalars equal up to rounding).
    """

    def __init__(self, eps: float = 1e-3, difference: str = "central") -> None:
        self.eps = check_positive(eps, "eps")
        if difference not in DIFFERENCES:
            raise ValueError(f"difference must be one of {', '.join(DIFFERENCES)}, got {difference!r}")
        self.difference = difference

    @torch.no_grad()
    def scalars(self, evaluator: Evaluator, model: nn.Module, inputs: Inputs, targets: Tensor, sampler: Sampler,
                frame: Frame, seeds: list[int], batched_limit: int,
                defer_last: bool = False) -> tuple[Tensor, float, tuple[int, float] | None]:
        """``(scalars, loss, pending)``: float64 scalars ``(K,)``, the loss (central: mean ``(L+ + L-)/2``; forward:
        ``L(theta)``) and, with ``defer_last``, the last in-place perturbation ``(seed, alpha)`` still to put back
        (the weights are otherwise as before, up to the rounding of ``+eps z - eps z``)."""
        scalars = torch.empty(len(seeds), dtype=torch.float64)
        if fits_batched(len(seeds), frame.params, batched_limit):
            try:
                loss = self._batched(evaluator, model, inputs, targets, sampler, frame, seeds, scalars)
                return scalars, loss, None
            except NonFiniteError:
                raise
            except (RuntimeError, NotImplementedError):  # e.g. a layer vmap cannot batch: go in place
                pass
        eps = self.eps
        base = evaluator.loss(model, inputs, targets) if self.difference == "forward" else 0.0
        losses = []
        pending: tuple[int, float] | None = None
        try:
            for k, s in enumerate(seeds):
                sampler.perturb_(frame, s, eps)
                pending = (s, -eps)
                with sampler.inside(frame, s, eps):
                    plus = evaluator.loss(model, inputs, targets)
                if self.difference == "central":
                    sampler.perturb_(frame, s, -2 * eps)
                    pending = (s, eps)
                    with sampler.inside(frame, s, -eps):
                        minus = evaluator.loss(model, inputs, targets)
                    scalars[k] = (plus - minus) / (2 * eps)
                    losses.append(0.5 * (plus + minus))
                else:
                    scalars[k] = (plus - base) / eps
                if not (defer_last and k == len(seeds) - 1):
                    sampler.perturb_(frame, *pending)
                    pending = None
        except BaseException:
            if pending is not None:
                sampler.perturb_(frame, *pending)
            raise
        loss = sum(losses) / len(losses) if losses else base
        if not (torch.isfinite(scalars).all() and torch.isfinite(torch.tensor(loss))):
            if pending is not None:
                sampler.perturb_(frame, *pending)
            check_finite(loss, "loss")
            check_finite(scalars.sum(), "loss difference")
        return scalars, loss, pending

    def _batched(self, evaluator: Evaluator, model: nn.Module, inputs: Inputs, targets: Tensor, sampler: Sampler,
                 frame: Frame, seeds: list[int], scalars: Tensor) -> float:
        """All ``K`` perturbed copies ``theta +- eps z_k`` in one ``vmap``-ed pass (``K`` x the weights in memory)."""
        params = frame.params
        z = sampler.dense(frame, seeds)
        eps = self.eps
        plus = evaluator.losses_at(model, params, [p.detach() + eps * zi for p, zi in zip(params, z)], inputs,
                                   targets).double().cpu()
        if self.difference == "central":
            minus = evaluator.losses_at(model, params, [p.detach() - eps * zi for p, zi in zip(params, z)], inputs,
                                        targets).double().cpu()
            scalars.copy_((plus - minus) / (2 * eps))
            loss = float((0.5 * (plus + minus)).mean())
        else:
            loss = evaluator.loss(model, inputs, targets)
            scalars.copy_((plus - loss) / eps)
        if not (torch.isfinite(scalars).all() and torch.isfinite(torch.tensor(loss))):
            check_finite(loss, "loss")
            check_finite(scalars.sum(), "loss difference")
        return loss

    def __repr__(self) -> str:
        return f"FiniteDifference(eps={self.eps!r}, difference={self.difference!r})"


class ForwardMode:
    """Forward-gradient scalars ``d_k = grad L . v_k`` by forward-mode AD (Baydin et al. 2022, Sec. 3, Eq. 1), exact
    and with no backward pass: one lazy pass per tangent (a layer's tangent exists only while it runs), or all
    ``K`` tangents of a small model in one ``vmap``-ed pass over dense tangents."""

    def scalars(self, evaluator: Evaluator, model: nn.Module, inputs: Inputs, targets: Tensor, sampler: Sampler,
                frame: Frame, seeds: list[int], batched_limit: int) -> tuple[Tensor, float]:
        """``(scalars, loss)``: float64 directional derivatives ``(K,)`` and the loss; weights untouched."""
        scalars = torch.empty(len(seeds), dtype=torch.float64)
        loss = float("nan")
        done = False
        if fits_batched(len(seeds), frame.params, batched_limit):
            try:  # small model: all K tangents in one vmapped forward-mode pass
                loss, d = evaluator.jvps(model, frame.params, sampler.dense(frame, seeds), inputs, targets)
                scalars.copy_(d)
                done = True
            except (RuntimeError, NotImplementedError):  # redo one at a time, which names the failing layer
                done = False
        if not done:
            for k, s in enumerate(seeds):
                loss, d = evaluator.jvp(model, inputs, targets, sampler.tangent_of(frame, s))
                scalars[k] = d
        check_finite(loss, "loss")
        check_finite(scalars.sum(), "directional derivative")
        return scalars, loss

    def into_grad(self, evaluator: Evaluator, model: nn.Module, inputs: Inputs, targets: Tensor, sampler: Sampler,
                  frame: Frame, seed: int) -> float:
        """One direction, no ``.grad`` yet: each parameter's tangent, made when its layer runs, is kept and becomes
        its ``.grad`` once scaled by ``d`` (the numbers of ``scalars`` + :class:`ToGrad` with one sweep of random
        numbers and no extra buffer; peak: weights + gradients + activations)."""
        kept: dict[int, Tensor] = {}
        of = sampler.tangent_of(frame, seed)

        def tangent_of(i: int, p: nn.Parameter) -> Any:
            if i not in kept:
                kept[i] = of(i, p)
            return kept[i]

        loss, d = evaluator.jvp(model, inputs, targets, tangent_of)
        check_finite(loss, "loss")
        check_finite(d, "directional derivative")
        for i, p in enumerate(frame.params):
            v = kept.pop(i) if i in kept else of(i, p)
            p.grad = v.mul_(d)
        return loss

    def __repr__(self) -> str:
        return "ForwardMode()"


# --- applicators for seeds and scalars ---------------------------------------------------------------------------
class ToGrad:
    """``p.grad += mean_k scalars[k] v_k`` for every trained parameter, each ``v_k`` regenerated from ``seeds[k]``
    (a missing ``.grad`` is written, not zero-filled first); any ``torch.optim`` optimizer then steps."""

    def apply(self, sampler: Sampler, frame: Frame, seeds: list[int], scalars: Tensor) -> None:
        scalars = torch.as_tensor(scalars)
        if len(seeds) != len(scalars):
            raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
        params = frame.params
        if not params or not seeds:
            return
        coefs = [float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
        fresh = [p.grad is None for p in params]
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        grads = [flat_view(p.grad, f"the gradient of parameter {i}").view_as(p) for i, p in enumerate(params)]
        sampler.add_(frame, grads, list(zip(seeds, coefs)), overwrite=fresh, what="the gradient of parameter")


class FusedSGD:
    """The SGD step ``p <- (1 - lr wd) p - lr mean_k scalars[k] v_k`` in place, without ``.grad``: one sweep over the
    weights (a pending perturbation from :meth:`FiniteDifference.scalars` is put back in the same sweep)."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr = check_positive(lr, "lr")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.weight_decay = weight_decay

    @torch.no_grad()
    def apply(self, sampler: Sampler, frame: Frame, seeds: list[int], scalars: Tensor,
              restore: tuple[int, float] | None = None) -> None:
        if len(seeds) != len(scalars):
            raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
        lr = self.lr
        decay = 1.0 - lr * self.weight_decay
        coefs = [-lr * float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
        sampler.add_(frame, [p.detach() for p in frame.params], list(zip(seeds, coefs)), decay, restore=restore)


# --- activity-space estimators: noise on unit outputs -> each unit's output gradient ---------------------------------
class LocalEstimate(NamedTuple):
    """An estimate of every perturbed unit's output gradient: ``records`` (saved inputs, noise record) in call order;
    ``signal(record)`` is the estimated ``dL/d(output)`` (it may reuse the record's memory)."""

    loss: float
    records: list[tuple[Saved, Any]]
    signal: Callable[[Any], Tensor]


@torch.no_grad()
def local_to_grad(estimate: LocalEstimate) -> None:
    """The applicator of unit-output estimates: each unit's parameter gradient from its own input and estimated output
    gradient (:func:`~.local.local_grads`) added to ``.grad``, last unit first, each record freed as it goes."""
    records = estimate.records
    while records:
        rec, record = records.pop()
        g = estimate.signal(record)
        accumulate_layer(rec.module, local_grads(rec, g))
        del rec, record, g


def _per_row(x: Tensor, like: Tensor) -> Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


class ActivityForwardMode:
    """Forward gradient with tangents on unit outputs (Ren et al. 2022, Sec. 3): one forward-mode pass adds
    ``u_l ~ N(0, I)`` to every unit's output tangent and gives per-example ``d_n = sum_l dL/dz_l[n] . u_l[n]``;
    ``d_n u_l[n] / K`` estimates unit ``l``'s output gradient (divided by ``scale = K`` passes).

    The unit whose output is the model's output gets the exact ``dL/dy`` (:func:`~.local.output_gradient`) and its
    tangent is taken out of ``d_n`` (exact: ``d_n`` is linear in the tangents), as Ren et al. train their classifier
    heads by their exact local gradient. Under batch statistics each example keeps its own ``d_n``: the other
    examples' tangents reach it only through the statistics, an O(1/N) share that is dropped (the batch sum
    ``sum_n d_n`` is unbiased but has N times the variance)."""

    def estimate(self, evaluator: Evaluator, model: nn.Module, inputs: Inputs, targets: Tensor,
                 units: list[tuple[str, nn.Module]], noise: UnitNoise, scale: int, what: str) -> LocalEstimate:
        made: list[tuple[int, torch.Size]] = []

        def rewrite(m: nn.Module, out: Any) -> tuple[Any, Tensor]:
            primal, tan = fwAD.unpack_dual(first_tensor(out))
            u = noise.draw(primal)
            made.append((primal.data_ptr(), primal.shape))
            return replace_first(out, fwAD.make_dual(primal, u if tan is None else tan + u)), u

        with evaluator.units(units, rewrite) as records:
            with torch.no_grad(), fwAD.dual_level(), math_attention():
                out = evaluator.run(model, inputs)
                primal, tan = fwAD.unpack_dual(out)
        if tan is None:
            raise RuntimeError(f"{what}: the model output does not depend on any perturbed layer")
        exact = None
        with torch.no_grad():
            loss = check_finite(evaluator.loss_fn(primal, targets), "loss")
            last = output_unit(primal, made)
            if last is not None:  # the output unit: exact gradient, and its tangent out of every other estimate
                tan, exact = tan - records[last][1], output_gradient(evaluator.loss_fn, primal.detach(), targets)
                records[last] = (records[last][0], exact)
            d = evaluator.per_example_directional(primal.detach(), targets, tan.detach())
        return LocalEstimate(loss, records, lambda u: u.div_(scale) if u is exact else u.mul_(_per_row(d, u) / scale))


class ScoreFunction:
    """The likelihood-ratio (score-function) estimate for Gaussian noise ``sigma e_l`` on every unit's output (Jiang
    et al. 2024, Sec. 3): ``d E[L] / d z_l = E[L e_l / sigma]``, over ``K`` noisy copies of the batch run as one
    batch of ``K N`` rows (batch statistics then couple one row's noise to another row's loss by O(1/(KN)): each row
    is scored with its own loss). ``reduce`` (:mod:`.variance`) pairs the noise and/or centres the losses.

    The unit whose output is the model's output gets the exact ``dL/dy`` at the noisy output
    (:func:`~.local.output_gradient`), and its noise's first-order share of every loss, ``sigma e . dL/dy`` with
    ``dL/dy`` taken before that noise (so the term has mean zero against every other unit's noise), is subtracted:
    a control variate that keeps the estimate unbiased.
    """

    def __init__(self, sigma: float = 0.1, reduce: Reduction | None = None) -> None:
        self.sigma = check_positive(sigma, "sigma")
        self.reduce = reduce if reduce is not None else Reduction()

    @torch.no_grad()
    def estimate(self, evaluator: Evaluator, model: nn.Module, inputs: Tensor, targets: Tensor,
                 units: list[tuple[str, nn.Module]], noise: UnitNoise) -> LocalEstimate:
        k, n = noise.directions, inputs.shape[0]
        made: list[tuple[int, torch.Size]] = []

        def rewrite(m: nn.Module, output: Any) -> tuple[Any, Tensor]:
            out = first_tensor(output)
            eps = noise.paired(out, n) if noise.pairs else noise.draw(out)
            noisy = out + self.sigma * eps
            made.append((noisy.data_ptr(), noisy.shape))
            return replace_first(output, noisy), eps

        repeated = targets.repeat(k, *([1] * (targets.dim() - 1)))
        with evaluator.units(units, rewrite) as records:
            out = evaluator.run(model, inputs.repeat(k, *([1] * (inputs.dim() - 1))))
        losses = evaluator.per_example(out, repeated).view(k, n)
        value = check_finite(losses.mean(), "loss")
        exact = None
        last = output_unit(out, made)
        if last is not None:  # the output unit: exact gradient; its noise's first-order share of each loss removed
            eps = records[last][1]
            exact = output_gradient(evaluator.loss_fn, out, repeated)
            clean = output_gradient(evaluator.loss_fn, out - self.sigma * eps, repeated) * (k * n)
            losses = losses - self.sigma * (clean * eps).flatten(1).sum(1).view(k, n)
            records[last] = (records[last][0], exact)
        coef = (self.reduce.centre(losses) / (k * n * self.sigma)).reshape(-1)
        del losses, out
        return LocalEstimate(value, records, lambda eps: eps if eps is exact else eps.mul_(_per_row(coef, eps)))

    def __repr__(self) -> str:
        return f"ScoreFunction(sigma={self.sigma!r}, reduce={self.reduce!r})"


__all__ = ["DIFFERENCES", "ActivityForwardMode", "FiniteDifference", "ForwardMode", "FusedSGD", "LocalEstimate",
           "ScoreFunction", "ToGrad", "local_to_grad"]
