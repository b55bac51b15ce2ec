"""Gradient quality: compare a rule's ``.grad`` estimate with the exact backprop gradient."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..data.batches import Inputs, call_model, logits_of
from ..rules.base import Rule, model_first, trainable_parameters


def _flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts]) if ts else torch.zeros(0, dtype=torch.float64)


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a, b) / (na * nb))


def _grads_of(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def true_gradient(model: nn.Module, rule: Rule, inputs: Inputs, targets: Tensor) -> list[Tensor]:
    """The exact gradient of ``rule.loss(model(inputs), targets)`` for every trainable parameter."""
    model_first(model, rule, "true_gradient")
    params = trainable_parameters(model)
    loss = rule.loss(logits_of(call_model(model, inputs)), targets)
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]


def gradient_alignment(
    model: nn.Module,
    rule: Rule,
    inputs: Inputs,
    targets: Tensor,
    samples: int = 1,
    names: bool = True,
) -> dict[str, Any]:
    """How close ``rule``'s estimate is to the exact gradient of ``rule.loss`` on one batch.

    Runs ``rule.grads`` ``samples`` times on a copy of the model (``model`` is left untouched, the
    rule's random stream advances) and returns:

    - ``cosine`` / ``norm_ratio``: of a single estimate (the first), over all parameters;
    - ``mean_cosine`` / ``mean_norm_ratio``: of the mean of the ``samples`` estimates (bias vs variance);
    - ``cosine_per_sample``: every single estimate's cosine;
    - ``per_parameter``: ``{name: {"cosine", "norm_ratio", "mean_cosine"}}``.

    Rules with a local objective (Forward-Forward, ...) are compared with the gradient of the global
    loss all the same: a low cosine there is a finding, not an error. Parameters the rule does not
    update count as a zero estimate; parameters the rule adds in ``attach`` (auxiliary heads) are left
    out. Parameters are matched by identity, so rules whose ``attach`` wraps the model are compared too.
    """
    model_first(model, rule, "gradient_alignment")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    work = copy.deepcopy(model)
    # the exact gradient of the original model's loss, matched to the copy's parameters by identity:
    # a rule may wrap the model or add parameters in ``attach`` (those get a zero reference)
    copied = trainable_parameters(work)
    ref = {id(p): g for p, g in zip(copied, true_gradient(copy.deepcopy(model), rule, inputs, targets))}
    work = rule.attach(work)
    params = trainable_parameters(work)
    pnames = [n for n, p in work.named_parameters() if p.requires_grad]
    # only the model's own parameters are compared (auxiliary parts have no end-to-end gradient)
    keep = [i for i, p in enumerate(params) if id(p) in ref]
    truth = [ref[id(params[i])] for i in keep]
    estimates: list[list[Tensor]] = []
    for _ in range(samples):
        for p in params:
            p.grad = None
        rule.grads(work, inputs, targets)
        estimates.append(_grads_of([params[i] for i in keep]))
    if any(e.shape != t.shape for e, t in zip(estimates[0], truth)):
        # the rule reshaped a parameter in place (Forward-Forward widens the first layer for the label): compare
        # with the exact gradient of the reshaped model, whose forward takes the same inputs
        exact = true_gradient(copy.deepcopy(work), rule, inputs, targets)
        truth = [exact[i] for i in keep]
    pnames = [pnames[i] for i in keep]
    mean = [torch.stack([e[i] for e in estimates]).mean(0) for i in range(len(keep))]
    t = _flat(truth)
    first = _flat(estimates[0])
    m = _flat(mean)
    tn = float(t.norm())
    out: dict[str, Any] = {
        "cosine": _cos(first, t),
        "norm_ratio": float(first.norm()) / tn if tn > 0 else float("nan"),
        "mean_cosine": _cos(m, t),
        "mean_norm_ratio": float(m.norm()) / tn if tn > 0 else float("nan"),
        "cosine_per_sample": [_cos(_flat(e), t) for e in estimates],
        "samples": samples,
    }
    if names:
        per = {}
        for i, n in enumerate(pnames):
            ti, ei, mi = (t.reshape(-1).double() for t in (truth[i], estimates[0][i], mean[i]))
            tin = float(ti.norm())
            per[n] = {
                "cosine": _cos(ei, ti),
                "norm_ratio": float(ei.norm()) / tin if tin > 0 else float("nan"),
                "mean_cosine": _cos(mi, ti),
            }
        out["per_parameter"] = per
    return out
