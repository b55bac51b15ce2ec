"""The forward-only toolkit: the parts that forward-only rules are composed from.

- samplers: :mod:`.directions` (random directions regenerated from integer seeds), :mod:`.lowrank` (low-rank
  directions ``U V^T / sqrt(r)`` applied inside the layers' forward passes), :mod:`.samplers` (both, and rank-one
  tangents, behind one :class:`Sampler` interface; :class:`UnitNoise` on unit outputs);
- the evaluator: :mod:`.evaluator` (every forward pass an estimator needs), over :mod:`.forward_mode` (directional
  derivatives of the loss by forward-mode AD);
- estimators and applicators: :mod:`.estimators` (finite difference, forward mode, score function; ``.grad`` or a
  fused SGD step, or per-layer local gradients from :mod:`.local`);
- variance reduction: :mod:`.variance` (antithetic pairs, a leave-one-out baseline, chained).
"""

from .directions import CHUNK, DISTRIBUTIONS, Directions, draw_seeds, flat_view, mix_seed
from .estimators import (
    ActivityForwardMode,
    FiniteDifference,
    ForwardMode,
    FusedSGD,
    LocalEstimate,
    ScoreFunction,
    ToGrad,
    local_to_grad,
)
from .evaluator import Evaluator, per_example_losses
from .forward_mode import BATCHED_LIMIT, RankOne, jvp_loss, math_attention, per_example_directional, sequential_jvp
from .local import PERTURBABLE, accumulate_layer, give_grad, layer_weight_grads, perturbable_layers
from .lowrank import LowRank, plan
from .samplers import Frame, FullSampler, LowRankSampler, RankOneSampler, Sampler, UnitNoise, sampler
from .variance import Antithetic, LeaveOneOut, Reduction, antithetic, chain, leave_one_out

__all__ = [
    "BATCHED_LIMIT",
    "CHUNK",
    "DISTRIBUTIONS",
    "PERTURBABLE",
    "ActivityForwardMode",
    "Antithetic",
    "Directions",
    "Evaluator",
    "FiniteDifference",
    "ForwardMode",
    "Frame",
    "FullSampler",
    "FusedSGD",
    "LeaveOneOut",
    "LocalEstimate",
    "LowRank",
    "LowRankSampler",
    "RankOne",
    "RankOneSampler",
    "Reduction",
    "Sampler",
    "ScoreFunction",
    "ToGrad",
    "UnitNoise",
    "accumulate_layer",
    "antithetic",
    "chain",
    "draw_seeds",
    "flat_view",
    "give_grad",
    "jvp_loss",
    "layer_weight_grads",
    "leave_one_out",
    "local_to_grad",
    "math_attention",
    "mix_seed",
    "per_example_directional",
    "per_example_losses",
    "perturbable_layers",
    "plan",
    "sampler",
    "sequential_jvp",
]
