"""The likelihood-ratio (score-function) gradient from one noisy forward pass, no backward pass at all.

``ulr`` is a composition of the parts in :mod:`forwardlearn.forward_only`: ``UnitNoise`` x
:class:`~forwardlearn.forward_only.estimators.ScoreFunction` with a variance reduction of
:mod:`~forwardlearn.forward_only.variance` x ``local_to_grad``, run by the shared ``Evaluator``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec
from ..forward_only import variance
from ..forward_only.estimators import ScoreFunction, local_to_grad
from ..forward_only.evaluator import Evaluator, per_example_losses
from ..forward_only.local import perturbed_units
from ..forward_only.samplers import UnitNoise
from .base import LossFn, Rule, check_int, check_positive, register

__all__ = ["UnifiedLikelihoodRatio", "per_example_losses"]


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
    A layer and the normalisation after it in one ``nn.Sequential`` are one unit (noise after the
    normalisation). Batch norm in training mode normalises over all ``K * N`` noisy rows, where one row's noise
    moves another row's loss by O(1/(KN)): each row's noise is scored with its own loss. The unit that
    produces the model's output gets the exact gradient of the loss at the noisy output
    (:func:`~forwardlearn.forward_only.local.output_gradient`, a derivative with respect to the output only),
    and its noise's first-order share ``sigma eps . dL/dy`` (``dL/dy`` taken before that noise, so the term has
    mean zero against every other unit's noise) is subtracted from every loss: a control variate.

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
        reduce = variance.antithetic() if antithetic else variance.leave_one_out() if baseline else variance.none()
        reduce.check(self.directions)
        self._estimator = ScoreFunction(self.sigma, reduce)
        self.antithetic = antithetic
        self.baseline = baseline
        self.blocks = check_block_spec(blocks)

    @property
    def copies(self) -> int:
        """The old name of :attr:`directions`."""
        return self.directions

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        units = perturbed_units(model, self.name, self.blocks)
        noise = UnitNoise(self.generator(inputs.device), self.directions, self._estimator.reduce.pairs)
        estimate = self._estimator.estimate(Evaluator(self.loss), model, inputs, targets, units, noise)
        local_to_grad(estimate)  # one unit at a time, its noisy inputs and noise freed as we go
        self.steps += 1
        return estimate.loss
