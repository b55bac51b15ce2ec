"""The forward-only toolkit: the parts that forward-only rules are built from.

- :mod:`.directions`: random directions regenerated from integer seeds (the sampler);
- :mod:`.lowrank`: low-rank directions ``U V^T / sqrt(r)`` per weight matrix, applied inside the layers' forward
  passes by hooks (the low-rank sampler);
- :mod:`.forward_mode`: directional derivatives of the loss by forward-mode AD (the forward-mode evaluator);
- :mod:`.local`: one layer's weight gradient from its input and an output signal (local gradients).
"""

from .directions import CHUNK, DISTRIBUTIONS, Directions, accumulate_directions, draw_seeds, flat_view, mix_seed
from .forward_mode import BATCHED_LIMIT, RankOne, jvp_loss, per_example_directional, sequential_jvp
from .local import PERTURBABLE, accumulate_layer, give_grad, layer_weight_grads, perturbable_layers
from .lowrank import LowRank, plan

__all__ = [
    "BATCHED_LIMIT",
    "CHUNK",
    "DISTRIBUTIONS",
    "PERTURBABLE",
    "Directions",
    "LowRank",
    "RankOne",
    "accumulate_directions",
    "accumulate_layer",
    "draw_seeds",
    "flat_view",
    "give_grad",
    "jvp_loss",
    "layer_weight_grads",
    "mix_seed",
    "per_example_directional",
    "perturbable_layers",
    "plan",
    "sequential_jvp",
]
