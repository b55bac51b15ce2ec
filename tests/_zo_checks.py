"""Checks of the seed-and-scalar API of ``zo_spsa`` shared by its full-perturbation and low-rank tests.

Each check takes a float64 ``model`` with a batch ``(x, y)`` and the rule's options (``perturbation``, ``rank``,
``difference``, ...); the calling test chooses the problems and the options it parametrises over.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import forwardlearn as fl


def mlp_problem(n: int = 16) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny float64 MLP (4 -> 5 -> 3, tanh: 43 parameters) on ``n`` random inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(2)
    return fl.models.mlp(4, [5], 3, activation="tanh").double(), x, y


def apply_reproduces_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **opts: Any) -> None:
    """``apply`` of the seeds and scalars that ``estimate`` returned, by any rule instance, fills ``.grad`` bit for
    bit as ``grads`` of a rule with the same seed does."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    seeds, scalars, _ = fl.get_rule("zo_spsa", directions=3, seed=4, **opts).estimate(a, x, y)
    fl.get_rule("zo_spsa", directions=3, seed=9, **opts).apply(a, seeds, scalars)  # any instance can apply
    fl.get_rule("zo_spsa", directions=3, seed=4, **opts).grads(b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def fused_step_equals_grads_plus_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                                     **opts: Any) -> None:
    """Three ``fused_step`` calls against ``grads`` + ``torch.optim.SGD`` (lr 0.05) from two copies of ``model``:
    the same loss at every step, no ``.grad`` buffer on the fused copy, the same weights."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra, rb = fl.get_rule("zo_spsa", seed=7, **opts), fl.get_rule("zo_spsa", seed=7, **opts)
    opt = torch.optim.SGD(b.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(3):
        la = ra.fused_step(a, x, y, lr=0.05, weight_decay=weight_decay)
        opt.zero_grad()
        lb = rb.grads(b, x, y)
        opt.step()
        assert la == pytest.approx(lb, rel=1e-12)
    assert all(p.grad is None for p in a.parameters())
    # same seeds and factors; only the order of float64 roundings differs (lr folded into the factors, the restore
    # after the perturbed forwards, or the in-place restore of a LayerNorm, folded into the update)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0.0, atol=1e-13)


def fused_apply_is_sgd_without_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **opts: Any) -> None:
    """``fused_apply`` (lr 0.1, weight decay 0.01) is ``apply`` + one SGD step, without any ``.grad`` buffer."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rule = fl.get_rule("zo_spsa", directions=2, seed=1, **opts)
    seeds, scalars, _ = rule.estimate(a, x, y)
    rule.fused_apply(a, seeds, scalars, lr=0.1, weight_decay=0.01)
    rule.apply(b, seeds, scalars)
    torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=0.01).step()
    assert all(p.grad is None for p in a.parameters())
    for p, q in zip(a.parameters(), b.parameters()):  # float64: the order of roundings differs, 1e-15 relative
        torch.testing.assert_close(p, q, rtol=0.0, atol=1e-14)
