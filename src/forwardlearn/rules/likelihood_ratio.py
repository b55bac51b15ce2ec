"""The likelihood-ratio (score-function) gradient from one noisy forward pass, no backward pass at all."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec, first_tensor, replace_first
from ..data.batches import call_model
from ..forward_only.local import (
    Saved,
    accumulate_layer,
    couples_examples,
    has_formula,
    local_grads,
    perturbed_units,
    save_inputs,
)
from .base import LossFn, Rule, check_finite, check_int, check_positive, register


def per_example_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn`` applied to each example alone (shape ``(N,)``); the batch loss is taken to be their mean."""
    if loss_fn is F.cross_entropy:
        return F.cross_entropy(outputs, targets, reduction="none")
    return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(outputs, targets)


@register
class UnifiedLikelihoodRatio(Rule):
    """Unified likelihood-ratio gradient (Jiang et al. 2024, "One Forward is Enough for Neural Network
    Training via Likelihood Ratio Method", Sec. 3: LR for noise on the pre-activations; Sec. 4: variance
    reduction by antithetic sampling and a baseline).

    The batch is repeated ``K = directions`` times (noisy copies) and pushed through the model once; the
    output of every perturbed unit gets Gaussian noise, ``z_l = W_l x_l + b_l + sigma eps_l``. Units: the
    blocks chosen by ``blocks`` (:func:`forwardlearn.blocks.select_blocks`; default every residual block and
    transformer layer, else every ``Linear``/``Conv2d``) plus every other module with trained parameters
    outside them; on an MLP or CNN exactly its ``Linear``/``Conv2d`` layers. With ``L`` the loss
    of one noisy copy of one example, the score function gives the gradient of the *smoothed* loss
    ``E_eps[L]``::

        d E[L] / d W_l = E[ L * (eps_l / sigma) x_l^T ],   d E[L] / d b_l = E[ L * eps_l / sigma ]

    estimated as the mean over copies and examples. The output signal ``L eps_l / sigma`` becomes parameter
    gradients locally (:func:`~forwardlearn.forward_only.local.local_grads`): by the layer's own formula for
    ``Linear``/``Conv2d``/``BatchNorm``/``LayerNorm`` (no backward pass at all), and by the vector-Jacobian
    product of the unit alone for any other unit (a residual block, a transformer layer: reverse mode
    inside that unit, never across units; Jiang et al. 2024 extend LR to such architectures, Sec. 5).
    Batch norm in training mode couples the examples (:func:`~forwardlearn.forward_only.local.couples_examples`):
    then every copy runs as its own batch (``K`` passes) and each example's noise is scored with its copy's
    total loss, which keeps the estimate unbiased at a higher variance.

    Variance reduction: ``antithetic=True`` pairs copy ``k`` with copy ``k + K/2`` carrying ``-eps`` in
    every layer, so each pair contributes ``(L(eps) - L(-eps)) eps / (2 sigma) x^T`` (any constant baseline
    cancels); otherwise ``baseline=True`` subtracts, per example, the mean loss of the *other* copies
    (leave-one-out, independent of the copy's own noise, so the estimate stays unbiased). The default
    is the baseline: at equal copies it measured a lower variance than antithetic pairs (a pair is
    one effective sample; see ``tests/test_likelihood_ratio.py``).

    ``loss`` must be a mean of per-example losses (cross-entropy is); the returned loss is the mean
    loss of the noisy copies. Predictions are noise-free (``model(inputs)``).

    Args:
        directions: noisy copies of the batch ``K`` (even when ``antithetic``); cost and activation memory
            grow linearly with it. (Formerly ``copies``, still accepted with a ``FutureWarning``.)
        sigma: noise standard deviation.
        antithetic: pair every noise sample with its negation.
        baseline: leave-one-out baseline (used when not ``antithetic``).
        blocks: where the noise goes (see above).
    """

    name: ClassVar[str] = "ulr"
    backward: ClassVar[str] = "none"
    description: ClassVar[str] = "likelihood ratio: score-function gradient from noise on pre-activations, one forward"
    paper: ClassVar[str] = ("Jiang, Zhang, Zhou, Yu & Liu 2024, One Forward is Enough for Neural Network "
                            "Training via Likelihood Ratio Method")
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 3e-3, "epochs": 12, "batch_size": 64, "hidden": [64], "model": "mlp",
    }
    forward_only: ClassVar[bool] = True

    def __init__(self, directions: int = 32, sigma: float = 0.1, antithetic: bool = False, baseline: bool = True,
                 blocks: BlockSpec = None, copies: int | None = None, loss: LossFn | None = None,
                 seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        if copies is not None:
            if directions != 32 and directions != copies:
                raise ValueError(f"copies={copies!r} is the old name of directions={directions!r}; pass one")
            warnings.warn("ulr: the option `copies` is now called `directions` (one name for K across rules)",
                          FutureWarning, stacklevel=2)
            directions = copies
        self.directions = check_int(directions, "directions", 1)
        self.sigma = check_positive(sigma, "sigma")
        if not isinstance(antithetic, bool) or not isinstance(baseline, bool):
            raise ValueError(f"antithetic and baseline must be bools, got {antithetic!r}, {baseline!r}")
        if antithetic and directions % 2:
            raise ValueError(f"antithetic sampling needs an even number of copies, got {directions} "
                             "(option directions)")
        if baseline and not antithetic and directions < 2:
            raise ValueError(f"a leave-one-out baseline needs directions >= 2, got {directions}")
        self.antithetic = antithetic
        self.baseline = baseline
        self.blocks = check_block_spec(blocks)

    @property
    def copies(self) -> int:
        """The old name of :attr:`directions`."""
        return self.directions

    @torch.no_grad()
    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        units = perturbed_units(model, self.name, self.blocks)
        k, n = self.directions, inputs.shape[0]
        coupled = couples_examples(model)
        gen = self.generator(inputs.device)
        saved: list[tuple[int, Saved, Tensor]] = []  # (copy or -1 for all copies, inputs, noise)
        rngs: dict[int, Tensor] = {}
        call = [-1, 0]  # the copy being run (coupled models run one copy per pass), the hook's position in it
        first_half: list[Tensor] = []

        def hook(m: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            out = first_tensor(output)
            shape = out.shape
            if coupled and self.antithetic and call[0] >= k // 2:  # the pair of an earlier copy: -eps
                eps = -first_half[(call[0] - k // 2) * len(units) + call[1]]
            elif self.antithetic and not coupled:
                half = torch.randn((k // 2, n, *shape[1:]), generator=gen, dtype=out.dtype, device=out.device)
                eps = torch.cat([half, -half]).view(shape)
            else:
                eps = torch.randn(shape, generator=gen, dtype=out.dtype, device=out.device)
                if coupled and self.antithetic:
                    first_half.append(eps)
            call[1] += 1
            saved.append((call[0], save_inputs(m, args, kwargs, rngs.pop(id(m), None)), eps))
            return replace_first(output, out + self.sigma * eps)

        handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in units]
        handles += [m.register_forward_pre_hook(lambda m, a: rngs.__setitem__(id(m), torch.get_rng_state()))
                    for _, m in units if not has_formula(m)]
        try:
            if coupled:  # batch statistics: each noisy copy is its own batch, as in ordinary training
                rows = []
                for c in range(k):
                    call[:] = [c, 0]
                    rows.append(per_example_losses(self.loss, first_tensor(call_model(model, inputs)), targets))
                losses = torch.stack(rows)
            else:
                out = first_tensor(call_model(model, inputs.repeat(k, *([1] * (inputs.dim() - 1)))))
                losses = per_example_losses(self.loss, out, targets.repeat(k, *([1] * (targets.dim() - 1))))
                losses = losses.view(k, n)
                del out
        finally:
            for h in handles:
                h.remove()
        first_half.clear()
        value = check_finite(losses.mean(), "loss")
        if coupled:  # an example's noise reaches every loss of its copy: score with the copy's total
            losses = losses.sum(1, keepdim=True).expand(k, n)
        if self.antithetic or not self.baseline:
            centred = losses
        else:
            centred = losses - (losses.sum(0, keepdim=True) - losses) / (k - 1)
        coef = centred / (k * n * self.sigma)
        del losses, centred
        while saved:  # one unit at a time, its noisy inputs and noise freed as we go
            c, rec, eps = saved.pop()
            scale = coef.reshape(-1) if c < 0 else coef[c]
            g = eps.mul_(scale.view(-1, *([1] * (eps.dim() - 1))))
            accumulate_layer(rec.module, local_grads(rec, g))
            del rec, eps, g
        self.steps += 1
        return value
