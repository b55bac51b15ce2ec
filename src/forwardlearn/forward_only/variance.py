"""Variance reduction as composable pieces: :func:`none`, :func:`antithetic`, :func:`leave_one_out`, :func:`chain`.

A piece acts at two places of a perturbation estimator ``g = mean_k c(L_k) e_k``: it may ask the sampler to draw
the ``K`` directions in pairs ``(e, -e)`` (:attr:`Reduction.pairs`) and it may replace the per-copy losses ``L_k``
by centred ones (:meth:`Reduction.centre`, a control variate that must not depend on copy ``k``'s own noise to keep
the estimate unbiased). Jiang et al. 2024 (One Forward is Enough, Sec. 4) use both for the likelihood ratio.

Where the math allows them:

- score function (:class:`~.estimators.ScoreFunction`): all three. Antithetic pairs cancel any constant baseline;
  a leave-one-out baseline *with* antithetic pairs would include the copy's partner, which depends on the copy's
  noise (biased), so :func:`chain` refuses that combination.
- finite differences (:class:`~.estimators.FiniteDifference`): the difference is the reduction. Central
  differences are antithetic pairs ``(L(theta + eps z) - L(theta - eps z)) / 2 eps``; forward differences subtract
  the exact baseline ``L(theta)`` (one extra forward). A leave-one-out baseline adds nothing to either.
- forward mode (:class:`~.estimators.ForwardMode`): none. ``d = grad . v`` is exact and linear in ``v``: a
  pair ``(v, -v)`` gives the same term twice, and ``E[d] = 0``, so the best constant baseline is zero.
"""

from __future__ import annotations

from torch import Tensor


class Reduction:
    """No variance reduction (the base piece): directions drawn independently, losses used as they are."""

    #: whether copy ``k + K/2`` must carry the negation of copy ``k``'s noise
    pairs: bool = False

    def check(self, k: int) -> None:
        """``ValueError`` when ``K = k`` directions do not suit this piece."""

    def centre(self, losses: Tensor) -> Tensor:
        """The per-copy losses ``(K, ...)`` with a control variate subtracted (here: unchanged)."""
        return losses

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Antithetic(Reduction):
    """Antithetic sampling: copy ``k + K/2`` carries ``-e_k``; a pair contributes ``(L(e) - L(-e)) e / 2`` and any
    constant baseline cancels within it (Jiang et al. 2024, Sec. 4.1)."""

    pairs = True

    def check(self, k: int) -> None:
        if k % 2:
            raise ValueError(f"antithetic sampling needs an even number of copies, got {k} (option directions)")


class LeaveOneOut(Reduction):
    """Baseline: subtract from copy ``k``'s loss the mean loss of the *other* copies of the same example, which is
    independent of copy ``k``'s noise, so the estimate stays unbiased (Jiang et al. 2024, Sec. 4.2)."""

    def check(self, k: int) -> None:
        if k < 2:
            raise ValueError(f"a leave-one-out baseline needs directions >= 2, got {k}")

    def centre(self, losses: Tensor) -> Tensor:
        k = losses.shape[0]
        return losses - (losses.sum(0, keepdim=True) - losses) / (k - 1)


class Chain(Reduction):
    """Several pieces applied in order (pairs when any piece pairs; each piece's centring in turn)."""

    def __init__(self, *pieces: Reduction) -> None:
        if any(isinstance(p, LeaveOneOut) for p in pieces) and any(p.pairs for p in pieces):
            raise ValueError("a leave-one-out baseline with antithetic pairs is biased (the partner copy depends on "
                             "the copy's noise); antithetic pairs already cancel any constant baseline")
        self.pieces = pieces
        self.pairs = any(p.pairs for p in pieces)

    def check(self, k: int) -> None:
        for p in self.pieces:
            p.check(k)

    def centre(self, losses: Tensor) -> Tensor:
        for p in self.pieces:
            losses = p.centre(losses)
        return losses

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.pieces))})"


def none() -> Reduction:
    """No variance reduction."""
    return Reduction()


def antithetic() -> Reduction:
    """Antithetic pairs ``(e, -e)`` (see :class:`Antithetic`)."""
    return Antithetic()


def leave_one_out() -> Reduction:
    """The leave-one-out baseline (see :class:`LeaveOneOut`)."""
    return LeaveOneOut()


def chain(*pieces: Reduction) -> Reduction:
    """The pieces composed in order (see :class:`Chain`)."""
    return Chain(*pieces)


__all__ = ["Antithetic", "Chain", "LeaveOneOut", "Reduction", "antithetic", "chain", "leave_one_out", "none"]
