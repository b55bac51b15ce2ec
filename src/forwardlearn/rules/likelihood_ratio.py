"""The likelihood-ratio (score-function) gradient from one noisy forward pass, no backward pass at all."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..forward_only.local import give_grad, layer_weight_grads, perturbable_layers
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

    The batch is repeated ``K = copies`` times and pushed through the model once; every ``Linear`` /
    ``Conv2d`` output gets Gaussian noise, ``z_l = W_l x_l + b_l + sigma eps_l``. With ``L`` the loss
    of one noisy copy of one example, the score function gives the gradient of the *smoothed* loss
    ``E_eps[L]``::

        d E[L] / d W_l = E[ L * (eps_l / sigma) x_l^T ],   d E[L] / d b_l = E[ L * eps_l / sigma ]

    estimated as the mean over copies and examples, with the layer's local formula
    (:func:`~forwardlearn.forward_only.local.layer_weight_grads`) and no backward pass.

    Variance reduction: ``antithetic=True`` pairs copy ``k`` with copy ``k + K/2`` carrying ``-eps`` in
    every layer, so each pair contributes ``(L(eps) - L(-eps)) eps / (2 sigma) x^T`` (any constant baseline
    cancels); otherwise ``baseline=True`` subtracts, per example, the mean loss of the *other* copies
    (leave-one-out, independent of the copy's own noise, so the estimate stays unbiased). The default
    is the baseline: at equal copies it measured a lower variance than antithetic pairs (a pair is
    one effective sample; see ``tests/test_likelihood_ratio.py``).

    ``loss`` must be a mean of per-example losses (cross-entropy is); the returned loss is the mean
    loss of the noisy copies. Predictions are noise-free (``model(inputs)``).

    Args:
        copies: noisy copies of the batch ``K`` (even when ``antithetic``); cost and activation memory
            grow linearly with it.
        sigma: noise standard deviation.
        antithetic: pair every noise sample with its negation.
        baseline: leave-one-out baseline (used when not ``antithetic``).
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

    def __init__(self, copies: int = 32, sigma: float = 0.1, antithetic: bool = False, baseline: bool = True,
                 loss: LossFn | None = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.copies = check_int(copies, "copies", 1)
        self.sigma = check_positive(sigma, "sigma")
        if not isinstance(antithetic, bool) or not isinstance(baseline, bool):
            raise ValueError(f"antithetic and baseline must be bools, got {antithetic!r}, {baseline!r}")
        if antithetic and copies % 2:
            raise ValueError(f"antithetic sampling needs an even number of copies, got {copies}")
        if baseline and not antithetic and copies < 2:
            raise ValueError(f"a leave-one-out baseline needs copies >= 2, got {copies}")
        self.antithetic = antithetic
        self.baseline = baseline

    @torch.no_grad()
    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        layers = perturbable_layers(model, self.name)
        k, n = self.copies, inputs.shape[0]
        gen = self.generator(inputs.device)
        saved: list[tuple[nn.Module, Tensor, Tensor]] = []

        def hook(m: nn.Module, args: Any, out: Tensor) -> Tensor:
            shape = out.shape
            if self.antithetic:
                half = torch.randn((k // 2, n, *shape[1:]), generator=gen, dtype=out.dtype, device=out.device)
                eps = torch.cat([half, -half]).view(shape)
            else:
                eps = torch.randn(shape, generator=gen, dtype=out.dtype, device=out.device)
            saved.append((m, args[0], eps))
            return out + self.sigma * eps

        handles = [m.register_forward_hook(hook) for _, m in layers]
        try:
            out = model(inputs.repeat(k, *([1] * (inputs.dim() - 1))))
        finally:
            for h in handles:
                h.remove()
        losses = per_example_losses(self.loss, out, targets.repeat(k, *([1] * (targets.dim() - 1)))).view(k, n)
        value = check_finite(losses.mean(), "loss")
        if self.antithetic or not self.baseline:
            centred = losses
        else:
            centred = losses - (losses.sum(0, keepdim=True) - losses) / (k - 1)
        coef = (centred / (k * n * self.sigma)).reshape(-1)
        del out, losses, centred
        while saved:  # one layer at a time, its noisy inputs and noise freed as we go
            m, x, eps = saved.pop()
            g = eps.mul_(coef.view(-1, *([1] * (eps.dim() - 1))))
            for name, grad in layer_weight_grads(m, x, g).items():
                p = m._parameters[name]
                if p is not None and p.requires_grad:
                    give_grad(p, grad)
            del m, x, eps, g
        self.steps += 1
        return value
