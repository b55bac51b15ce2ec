"""Shapley values the expensive way, to check and to compete with :class:`~forwardlearn.models.HarsanyiNet`.

A *game* is a function ``value(masks) -> (M,)`` that maps ``M`` coalitions (boolean ``(M, n)`` rows, True
= the variable is present, False = it takes its baseline value) to the model output being explained.
The Shapley value (Shapley 1953) of variable ``i`` is::

    phi(i) = sum_{S subset N \\ {i}} |S|! (n - |S| - 1)! / n!  * (v(S + i) - v(S))

* :func:`brute_force_shapley` evaluates every one of the ``2^n`` coalitions (exact; ``n <= 20``).
* :func:`permutation_shapley` averages marginal contributions along random orderings
  (Castro, Gomez & Tejada 2009, "Polynomial calculation of the Shapley value based on sampling"),
  optionally with antithetic (reversed) orderings (Mitchell et al. 2022, JMLR 23(43), Sec. 4); it
  costs ``n - 1`` evaluations per ordering.
* :func:`masked_input_game` builds the game of any model that masks raw inputs to a baseline, and
  :func:`harsanyi_game` the game of a HarsanyiNet over its own input variables.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Game = Callable[[Tensor], Tensor]

#: the largest number of variables :func:`brute_force_shapley` enumerates (2^20 evaluations)
MAX_BRUTE_FORCE = 20


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"number of variables must be a positive integer, got {n!r}")
    return n


def _evaluate(game: Game, masks: Tensor, batch_size: int) -> Tensor:
    out = [game(masks[i : i + batch_size]).reshape(-1) for i in range(0, len(masks), batch_size)]
    values = torch.cat(out)
    if values.shape[0] != masks.shape[0]:
        raise ValueError(f"the game returned {values.shape[0]} values for {masks.shape[0]} coalitions")
    return values


@torch.no_grad()
def brute_force_shapley(game: Game, n: int, *, batch_size: int = 4096, device: torch.device | str = "cpu") -> Tensor:
    """Exact Shapley values ``(n,)`` by evaluating the game on all ``2^n`` coalitions."""
    _check_n(n)
    if n > MAX_BRUTE_FORCE:
        raise ValueError(f"brute force needs 2^{n} evaluations; at most {MAX_BRUTE_FORCE} variables are allowed")
    codes = torch.arange(2**n, device=device)
    bits = 1 << torch.arange(n, device=device)
    masks = (codes[:, None] & bits[None]) != 0  # (2^n, n), row c = coalition with bit i set iff i present
    v = _evaluate(game, masks, batch_size)
    size = masks.sum(1)
    # weight of a coalition S of size s not containing i: s! (n-s-1)! / n!
    w = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
                     dtype=v.dtype, device=v.device)
    phi = torch.empty(n, dtype=v.dtype, device=v.device)
    for i in range(n):
        without = codes[~masks[:, i]]
        phi[i] = (w[size[without]] * (v[without | (1 << i)] - v[without])).sum()
    return phi


@torch.no_grad()
def permutation_shapley(
    game: Game,
    n: int,
    permutations: int,
    *,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Monte-Carlo Shapley estimate ``(n,)`` from ``permutations`` random orderings.

    With ``antithetic=True`` half the orderings are the reverses of the other half (``permutations``
    must then be even). ``v(empty)`` and ``v(N)`` are evaluated once, so the cost is
    ``permutations * (n - 1) + 2`` game evaluations. Every estimate satisfies efficiency exactly:
    the marginal contributions along one ordering telescope to ``v(N) - v(empty)``.
    """
    _check_n(n)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations <= 0:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    if antithetic and permutations % 2:
        raise ValueError(f"antithetic sampling needs an even number of permutations, got {permutations}")
    m = permutations // 2 if antithetic else permutations
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(m)]).to(device)
    if antithetic:
        orders = torch.cat([orders, orders.flip(1)])
    # prefix masks: prefix k of ordering p holds its first k variables, k = 1..n-1
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(n, device=orders.device).expand_as(orders))
    k = torch.arange(1, n, device=orders.device)
    inner = (rank[:, None, :] < k[None, :, None]).reshape(-1, n)  # (P*(n-1), n)
    ends = torch.stack([torch.zeros(n, dtype=torch.bool, device=orders.device),
                        torch.ones(n, dtype=torch.bool, device=orders.device)])
    v_ends = _evaluate(game, ends, batch_size)
    v_inner = _evaluate(game, inner, batch_size).view(len(orders), n - 1) if n > 1 else v_ends[:0].view(len(orders), 0)
    chain = torch.cat([v_ends[:1].expand(len(orders), 1), v_inner, v_ends[1:].expand(len(orders), 1)], 1)
    marginal = chain[:, 1:] - chain[:, :-1]  # (P, n): contribution of the k-th variable in each ordering
    phi = torch.zeros(n, dtype=marginal.dtype, device=marginal.device)
    phi.index_add_(0, orders.reshape(-1), marginal.reshape(-1))
    return phi / len(orders)


def _target_index(target: int) -> int:
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target must be a non-negative class index, got {target!r}")
    return target


def masked_input_game(model: Callable[[Tensor], Tensor], x: Tensor, baseline: Tensor, target: int) -> Game:
    """The game of ``model``'s output ``target`` on one input ``x`` whose entries are masked to ``baseline``.

    ``x`` and ``baseline`` have the model's input shape (without the batch axis); the variables are the
    entries of ``x`` in row-major order.
    """
    if x.shape != baseline.shape:
        raise ValueError(f"x {tuple(x.shape)} and baseline {tuple(baseline.shape)} must have the same shape")
    t = _target_index(target)
    flat_x, flat_b = x.reshape(-1), baseline.reshape(-1).to(x)

    def value(masks: Tensor) -> Tensor:
        inputs = torch.where(masks.to(x.device), flat_x, flat_b).view(-1, *x.shape)
        return model(inputs)[:, t]

    return value


def harsanyi_game(model: nn.Module, x: Tensor, target: int) -> Game:
    """The game of a HarsanyiNet's output ``target`` on one input ``x`` over its own input variables.

    A masked variable is a zero column of ``z^(0)`` (:meth:`HarsanyiNet.features`): for the MLP form and
    ``stem=False`` this is the input at the baseline; with the convolutional stem, the paper's masking of
    ``z^(0)`` positions.
    """
    t = _target_index(target)
    with torch.no_grad():
        z0 = model.features(x.unsqueeze(0))  # (1, C0, V)

    def value(masks: Tensor) -> Tensor:
        z = z0 * masks.to(z0.device, z0.dtype)[:, None, :]
        return model.forward_features(z)[0][:, t]

    return value
