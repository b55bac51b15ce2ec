"""The evaluator: the one place where forward-only estimators run the model.

It turns ``(model, batch, directions)`` into what an estimator needs, always without a backward pass:

- :meth:`Evaluator.loss`: the loss at the current weights (weights perturbed in place, or inside the layers);
- :meth:`Evaluator.losses_at`: the losses at ``K`` perturbed copies of the weights in one ``vmap``-ed pass;
- :meth:`Evaluator.jvp` / :meth:`Evaluator.jvps`: the loss and its directional derivative along one tangent
  (forward-mode AD, one layer's tangent at a time) or along ``K`` tangents at once (``vmap``);
- :meth:`Evaluator.units`: a forward pass with every perturbed unit's output rewritten (noise, or a tangent)
  and its input saved for the unit's local gradient; :meth:`Evaluator.per_example` /
  :func:`per_example_losses`: what the loss says about each example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import first_tensor
from ..data.batches import Inputs, call_model, logits_of
from ..rules.base import LossFn
from . import forward_mode
from .forward_mode import Tangent, functional_call, math_attention, per_example_directional
from .local import Saved, has_formula, save_inputs

#: ``rewrite(unit, output) -> (new output, record)``: what :meth:`Evaluator.units` does at each unit
Rewrite = Callable[[nn.Module, Any], tuple[Any, Any]]


def per_example_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn`` applied to each example alone (shape ``(N,)``); the batch loss is taken to be their mean."""
    if loss_fn is F.cross_entropy:
        return F.cross_entropy(outputs, targets, reduction="none")
    return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(outputs, targets)


def fits_batched(k: int, params: Sequence[Tensor], limit: int) -> bool:
    """Whether ``K > 1`` copies (or tangents) of ``params`` take the ``vmap``-ed path: ``K`` x weights <= ``limit``."""
    return k > 1 and k * sum(p.numel() for p in params) <= limit


class Evaluator:
    """Runs ``model`` on a batch for an estimator, forward passes only (see the module docstring).

    Args:
        loss: ``loss(outputs, targets) -> scalar``, as the rule's ``loss``.
    """

    def __init__(self, loss: LossFn) -> None:
        self.loss_fn = loss

    @torch.no_grad()
    def loss(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> float:
        """The loss at the model's current weights (inside any perturbation context)."""
        return float(self.loss_fn(logits_of(call_model(model, inputs)), targets))

    def functional_loss(self, model: nn.Module, params: list[nn.Parameter], inputs: Inputs,
                        targets: Tensor) -> Callable[..., Tensor]:
        """``(*weights) -> loss`` with ``weights`` in place of ``params`` (for ``vmap`` and ``torch.func.jvp``)."""
        names = {id(p): n for n, p in model.named_parameters()}
        keys = [names[id(p)] for p in params]

        def loss_at(*ws: Tensor) -> Tensor:
            return self.loss_fn(logits_of(functional_call(model, dict(zip(keys, ws)), inputs)), targets)

        return loss_at

    def losses_at(self, model: nn.Module, params: list[nn.Parameter], weights: Sequence[Tensor], inputs: Inputs,
                  targets: Tensor) -> Tensor:
        """The losses at ``K`` copies of the weights (``weights[i]``: ``(K, *params[i].shape)``), one ``vmap``-ed
        pass; the model's own weights are never touched."""
        return torch.func.vmap(self.functional_loss(model, params, inputs, targets))(*weights)

    def jvp(self, model: nn.Module, inputs: Inputs, targets: Tensor,
            tangent_of: Callable[[int, nn.Parameter], Tangent | None]) -> tuple[float, float]:
        """``(loss, grad . v)`` by one forward-mode pass (:func:`~.forward_mode.jvp_loss`)."""
        return forward_mode.jvp_loss(model, inputs, targets, self.loss_fn, tangent_of)

    def jvps(self, model: nn.Module, params: list[nn.Parameter], tangents: Sequence[Tensor], inputs: Inputs,
             targets: Tensor) -> tuple[float, Tensor]:
        """``(loss, d)`` with ``d[k] = grad . v_k`` (float64, CPU) for ``K`` dense tangents, ``vmap``-ed."""
        loss_of = self.functional_loss(model, params, inputs, targets)
        primals = tuple(p.detach() for p in params)

        def one(*ts: Tensor) -> tuple[Tensor, Tensor]:
            return torch.func.jvp(loss_of, primals, ts)

        with math_attention():
            values, d = torch.func.vmap(one)(*tangents)
        return float(values[0].detach()), d.detach().to(torch.float64).cpu()

    @contextmanager
    def units(self, units: list[tuple[str, nn.Module]], rewrite: Rewrite) -> Iterator[list[tuple[Saved, Any]]]:
        """Inside the block, every call of a unit's forward returns ``rewrite(unit, output)[0]`` and appends
        ``(saved inputs, rewrite(...)[1])`` to the yielded list, in call order. A unit without a closed-form local
        gradient also keeps the random-number state it ran with (its re-run for the local gradient replays it)."""
        saved: list[tuple[Saved, Any]] = []
        rngs: dict[int, Tensor] = {}

        def hook(m: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            new, record = rewrite(m, out)
            saved.append((save_inputs(m, args, kwargs, rngs.pop(id(m), None)), record))
            return new

        handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in units]
        handles += [m.register_forward_pre_hook(lambda m, a: rngs.__setitem__(id(m), torch.get_rng_state()))
                    for _, m in units if not has_formula(m)]
        try:
            yield saved
        finally:
            for h in handles:
                h.remove()

    def run(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """The model's first output tensor (its logits)."""
        return first_tensor(call_model(model, inputs))

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The per-example losses of ``outputs`` (:func:`per_example_losses`)."""
        return per_example_losses(self.loss_fn, outputs, targets)

    def per_example_directional(self, outputs: Tensor, targets: Tensor, tangent: Tensor) -> Tensor:
        """``d_n = dL/d outputs[n] . tangent[n]`` (:func:`~.forward_mode.per_example_directional`)."""
        return per_example_directional(self.loss_fn, outputs, targets, tangent)


__all__ = ["Evaluator", "Rewrite", "fits_batched", "per_example_losses"]
