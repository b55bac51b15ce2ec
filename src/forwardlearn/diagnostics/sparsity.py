"""Activity sparsity: how many hidden units stay (nearly) silent.

Tosato et al. 2023, "Emergent representations in networks trained with the Forward-Forward algorithm",
report that Forward-Forward hidden layers end up with sparse, ensemble-like activity: for each input,
most units are silent and a small set is strongly active. :func:`activity_sparsity` measures this the
same way on any model, so a Forward-Forward net and a backprop net can be compared.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models.basic import ACTIVATIONS

__all__ = ["activity_sparsity", "sparsity_of"]


def sparsity_of(acts: Tensor, tol: float = 0.01) -> dict[str, float]:
    """Sparsity statistics of one layer's activities ``(N, ...)`` (flattened per example to ``(N, D)``).

    - ``silent``: fraction of (example, unit) pairs with ``|a| <= tol * max_j |a_j|`` (the example's
      strongest unit in that layer), i.e. near-silent relative to the layer's own scale, so layers
      whose activity lengths differ (Forward-Forward's grow with training) compare fairly;
    - ``dead``: fraction of units near-silent on every example;
    - ``hoyer``: mean Hoyer sparsity ``(sqrt(D) - |a|_1 / |a|_2) / (sqrt(D) - 1)``, 0 for a flat
      vector, 1 for a single active unit (examples with no activity count as 1).
    """
    a = acts.detach().flatten(1).abs().double()
    n, d = a.shape
    if n == 0 or d == 0:
        raise ValueError(f"activities must have at least one example and one unit, got shape {tuple(acts.shape)}")
    peak = a.max(1, keepdim=True).values
    silent = a <= tol * peak
    l1 = a.sum(1)
    l2 = a.pow(2).sum(1).sqrt()
    if d > 1:
        ratio = torch.where(l2 > 0, l1 / l2.clamp_min(1e-300), torch.full_like(l1, 1.0))
        hoyer = float(((d**0.5 - ratio) / (d**0.5 - 1)).mean())
    else:
        hoyer = 1.0
    return {"silent": float(silent.double().mean()), "dead": float(silent.all(0).double().mean()), "hoyer": hoyer}


def _hooked_activities(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """Outputs of every activation layer of ``model`` (or of every Linear/Conv but the last, if none)."""
    act_types = tuple(ACTIVATIONS.values())
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, act_types)]
    if not named:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        named = layers[:-1]
    if not named:
        raise ValueError("activity_sparsity: the model has no activation layer and no hidden Linear/Conv layer")
    out: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, name=n: out.__setitem__(name, o.detach())) for n, m in named]
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: out[n] for n, _ in named if n in out}


@torch.no_grad()
def activity_sparsity(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    rule: Any = None,
    tol: float = 0.01,
) -> dict[str, dict[str, float]]:
    """Per hidden layer, the fraction of near-silent units and related statistics (see :func:`sparsity_of`).

    The activities are those of a plain forward pass (the output of every activation layer), or, when
    ``rule`` has an ``activities(model, inputs, labels)`` method (Forward-Forward does), the ones the
    rule itself computes: for Forward-Forward, the inputs with ``targets`` written in as the label
    (``None``: the neutral label) and every layer's input length-normalised. Returns
    ``{layer name: {"silent", "dead", "hoyer"}}`` in layer order.
    """
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    was_training = model.training
    model.eval()
    try:
        if rule is not None and hasattr(rule, "activities"):
            acts = {f"layer{i}": a for i, a in enumerate(rule.activities(model, inputs, targets))}
        else:
            acts = _hooked_activities(model, inputs)
    finally:
        model.train(was_training)
    return {name: sparsity_of(a, tol) for name, a in acts.items()}
