"""Forward gradients: the gradient estimated from directional derivatives computed by forward-mode AD.

- ``forward_gradient`` (Baydin et al. 2022): weight perturbation, ``g = (grad . v) v``;
- ``activity_forward_gradient`` (Ren et al. 2022): perturb every layer's output instead of its weights.

``local_forward_gradient`` (Fournier et al. 2023) is in :mod:`.local_forward_gradient`; the parts all three
are built from (seeded directions, forward-mode evaluation, local gradients) are in
:mod:`forwardlearn.forward_only`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec, first_tensor, replace_first
from ..data.batches import call_model, logits_of
from ..forward_only.directions import Directions, accumulate_directions, draw_seeds, flat_view
from ..forward_only.forward_mode import (
    BATCHED_LIMIT,
    TANGENTS,
    RankOne,
    Tangent,
    functional_call,
    jvp_loss,
    math_attention,
    per_example_directional,
)
from ..forward_only.local import (
    Saved,
    accumulate_layer,
    couples_examples,
    has_formula,
    local_grads,
    perturbed_units,
    save_inputs,
)
from .base import LossFn, Rule, SeedScalarRule, check_finite, check_int, register, trainable_parameters


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
        self._dirs = Directions(distribution)

    # --- tangents ------------------------------------------------------------------------------------
    def _layout(self, params: list[nn.Parameter]) -> tuple[list[int], list[list[int]]]:
        """The lengths of the random vectors a direction is made of, and which of them each parameter uses:
        one per parameter (``full``), or two factors per weight matrix (``rank1``)."""
        if self.tangent == "full":
            return [p.numel() for p in params], [[i] for i in range(len(params))]
        numels: list[int] = []
        slots: list[list[int]] = []
        for p in params:
            sizes = [p.shape[0], p.numel() // p.shape[0]] if p.dim() >= 2 else [p.numel()]
            slots.append(list(range(len(numels), len(numels) + len(sizes))))
            numels.extend(sizes)
        return numels, slots

    def _tangent(self, seed: int, layout: tuple[list[int], list[list[int]]], i: int, p: Tensor) -> Tangent:
        """Parameter ``i``'s tangent of direction ``seed`` (a :class:`RankOne` for ``rank1`` weights)."""
        numels, slots = layout
        if len(slots[i]) == 1:
            return self._dirs.param(seed, numels, slots[i][0], p.detach())
        j, k = slots[i]
        u = self._dirs.param(seed, numels, j, torch.empty(numels[j], dtype=p.dtype, device=p.device))
        r = self._dirs.param(seed, numels, k, torch.empty(numels[k], dtype=p.dtype, device=p.device))
        return RankOne(u, r)

    def estimate(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[list[int], Tensor, float]:
        """``(seeds, scalars, loss)``: directional derivatives along ``K`` seeded tangents (see class doc)."""
        seeds = draw_seeds(self.generator("cpu"), self.directions)
        scalars = torch.empty(len(seeds), dtype=torch.float64)
        loss = float("nan")
        params = trainable_parameters(model)
        layout = self._layout(params)
        done = False
        if len(seeds) > 1 and len(seeds) * sum(p.numel() for p in params) <= BATCHED_LIMIT:
            try:  # small model: all K tangents in one vmapped forward-mode pass
                loss, d = self._batched(model, inputs, targets, params, layout, seeds)
                scalars.copy_(d)
                done = True
            except (RuntimeError, NotImplementedError):  # redo one at a time, which names the failing layer
                done = False
        if not done:
            for k, s in enumerate(seeds):
                loss, d = jvp_loss(model, inputs, targets, self.loss,
                                   lambda i, p, s=s: self._tangent(s, layout, i, p))
                scalars[k] = d
        check_finite(loss, "loss")
        check_finite(scalars.sum(), "directional derivative")
        return seeds, scalars, loss

    def _batched(self, model: nn.Module, inputs: Tensor, targets: Tensor, params: list[nn.Parameter],
                 layout: tuple[list[int], list[list[int]]], seeds: list[int]) -> tuple[float, Tensor]:
        """The same directional derivatives as the one-at-a-time pass, ``vmap``-ed over the ``K`` tangents."""
        names = {id(p): n for n, p in model.named_parameters()}
        keys = [names[id(p)] for p in params]
        primals = tuple(p.detach() for p in params)
        tangents = tuple(torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=p.device) for p in params)
        for k, s in enumerate(seeds):
            if self.tangent == "full":
                for i, a, b, z in self._dirs.pieces(s, layout[0], params[0].device):
                    tangents[i][k].view(-1)[a:b].copy_(z)
            else:
                for i, p in enumerate(params):
                    t = self._tangent(s, layout, i, p)
                    tangents[i][k].copy_(t.full(p) if isinstance(t, RankOne) else t)

        def loss_of(*ps: Tensor) -> Tensor:
            return self.loss(logits_of(functional_call(model, dict(zip(keys, ps)), inputs)), targets)

        def one(*ts: Tensor) -> tuple[Tensor, Tensor]:
            return torch.func.jvp(loss_of, primals, ts)

        with math_attention():
            values, d = torch.func.vmap(one)(*tangents)
        return float(values[0].detach()), d.detach().to(torch.float64).cpu()

    def apply(self, model: nn.Module, seeds: list[int], scalars: Tensor) -> None:
        """Accumulate ``mean_k scalars[k] * v_k`` into ``.grad`` (``v_k`` regenerated from ``seeds[k]``)."""
        params = trainable_parameters(model)
        scalars = torch.as_tensor(scalars)
        if self.tangent == "full":
            accumulate_directions(params, self._dirs, list(seeds), scalars)
            return
        if len(seeds) != len(scalars):
            raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
        coefs = [float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
        layout = self._layout(params)
        for i, p in enumerate(params):
            for seed, c in zip(seeds, coefs):
                t = self._tangent(seed, layout, i, p)
                if p.grad is None:  # the first term writes the buffer: no zero fill, no extra pass
                    p.grad = (torch.outer(t.u, t.r).mul_(c).view_as(p) if isinstance(t, RankOne)
                              else t.mul_(c))
                elif isinstance(t, RankOne):
                    flat_view(p.grad, f"the gradient of parameter {i}").view(t.u.numel(), -1).addr_(t.u, t.r, alpha=c)
                else:
                    p.grad.add_(t, alpha=c)

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        params = trainable_parameters(model)
        if (self.reuse_tangents and self.tangent == "full" and self.directions == 1 and params
                and all(p.grad is None for p in params)):
            loss = self._grads_one(model, inputs, targets, params)
        else:
            seeds, scalars, loss = self.estimate(model, inputs, targets)
            self.apply(model, seeds, scalars)
        self.steps += 1
        return loss

    def _grads_one(self, model: nn.Module, inputs: Tensor, targets: Tensor, params: list[nn.Parameter]) -> float:
        """``K = 1`` and no ``.grad`` yet: each layer's tangent, made when the layer runs, is kept and
        becomes its ``.grad`` once scaled by ``d`` -- the same numbers as ``estimate`` + ``apply`` with
        one sweep of random numbers and no extra buffer (peak: weights + gradients + activations)."""
        (seed,) = draw_seeds(self.generator("cpu"), 1)
        numels = [p.numel() for p in params]
        kept: dict[int, Tensor] = {}

        def tangent_of(i: int, p: nn.Parameter) -> Tensor:
            if i not in kept:
                kept[i] = self._dirs.param(seed, numels, i, p.detach())
            return kept[i]

        loss, d = jvp_loss(model, inputs, targets, self.loss, tangent_of)
        check_finite(loss, "loss")
        check_finite(d, "directional derivative")
        for i, p in enumerate(params):
            v = kept.pop(i) if i in kept else self._dirs.param(seed, numels, i, p.detach())
            p.grad = v.mul_(d)
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
    CNN exactly its ``Linear``/``Conv2d`` layers, and the rule is then forward-only. When batch norm
    normalises with batch statistics (:func:`~forwardlearn.forward_only.local.couples_examples`), one
    example's tangent reaches every example's loss, so every example uses the batch's directional derivative
    ``d = sum_n d_n`` instead of its own (unbiased again, at a higher variance). ``directions=K`` averages
    ``K`` independent passes (default 4, tuned for ``digits``; the paper uses 1).
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
        coupled = couples_examples(model)
        gen = self.generator(inputs.device)
        loss = float("nan")
        for _ in range(self.directions):
            saved: list[tuple[Saved, Tensor]] = []
            rngs: dict[int, Tensor] = {}

            def hook(m: nn.Module, args: Any, kwargs: Any, out: Any, saved: list = saved, rngs: dict = rngs) -> Any:
                primal, tan = fwAD.unpack_dual(first_tensor(out))
                u = torch.randn(primal.shape, generator=gen, dtype=primal.dtype, device=primal.device)
                saved.append((save_inputs(m, args, kwargs, rngs.pop(id(m), None)), u))
                return replace_first(out, fwAD.make_dual(primal, u if tan is None else tan + u))

            handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in units]
            handles += [m.register_forward_pre_hook(lambda m, a, r=rngs: r.__setitem__(id(m), torch.get_rng_state()))
                        for _, m in units if not has_formula(m)]
            try:
                with torch.no_grad(), fwAD.dual_level(), math_attention():
                    out = first_tensor(call_model(model, inputs))
                    primal, tan = fwAD.unpack_dual(out)
            finally:
                for h in handles:
                    h.remove()
            if tan is None:
                raise RuntimeError(f"{self.name}: the model output does not depend on any perturbed layer")
            with torch.no_grad():
                loss = check_finite(self.loss(primal, targets), "loss")
                d = per_example_directional(self.loss, primal.detach(), targets, tan.detach())
                if coupled:  # every example's tangent reaches every output: the batch's derivative for all
                    d = d.sum().expand_as(d)
                while saved:  # one unit at a time, its inputs and tangents freed as we go
                    rec, u = saved.pop()
                    g = u.mul_(d.view(-1, *([1] * (u.dim() - 1))) / self.directions)
                    accumulate_layer(rec.module, local_grads(rec, g))
                    del rec, u, g
        self.steps += 1
        return loss
