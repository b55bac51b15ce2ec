"""A convergent (energy-based, fixed-point) layered network for equilibrium propagation.

:class:`ConvergentNet` is the layered Hopfield-like network of Scellier & Bengio (2017; its energy
function) in the discrete-time "primitive function" form of Laborieux et al. (2021, "Scaling
equilibrium propagation to deep ConvNets") and Laborieux & Zenke (2022, 2024; their reference code,
Laborieux-Axel/holomorphic_eqprop and generalized-holo-ep): hidden states ``a_1 .. a_L`` with
values in ``[0, 1]`` (input ``a_0 = x`` is clamped) relax to a fixed point of

    a_l = rho(W_{l-1} a_{l-1} + b_{l-1} + V_l a_{l+1})        (top layer: plus a nudge, see below)

where ``V_l = W_l^T`` for symmetric weights (then the fixed points are the stationary points of the
Hopfield energy ``E(a) = 1/2 sum_l |a_l|^2 - sum_l a_{l+1}^T (W_l a_l + b_l)`` restricted to the
box) and ``V_l = B_l``, a separate trainable feedback matrix, for non-symmetric weights (then the
dynamics is a general vector field without an energy, as in the generalised EP of Laborieux & Zenke 2024). The class
scores are a feed-forward read-out ``logits = R a_L + c`` of the top layer (the cross-entropy
setting of Laborieux et al. 2021). A nudge ``-beta * dl/da_L`` added to the top layer's
input implements the nudged phase of equilibrium propagation.

Relaxation is block Gauss-Seidel: layers are updated bottom-up, each from the newest values of its
neighbours. With symmetric weights and the hard sigmoid each layer update is the exact minimiser of
``E`` over that layer (within the box), so the free phase is block-coordinate descent: the energy
decreases monotonically. **Convergence criterion**: the largest absolute change of any unit in one
sweep is below ``tol`` (default ``1e-3``); **iteration cap**: ``max_iters`` sweeps (default 20; like
the fixed step counts of the reference implementations, the cap often ends a relaxation before the
criterion is met, an approximation EP tolerates). The last relaxation's sweep count, residual and
whether it met the criterion are kept in ``last_relaxation``.

``model(x)`` returns the read-out of the free fixed point, differentiable by implicit
differentiation at the fixed point (the implicit function theorem, as in recurrent backpropagation,
Almeida 1987 / Pineda 1987, and deep equilibrium models, Bai et al. 2019): the adjoint equation
``y = g + (df/da)^T y`` is solved by fixed-point iteration (criterion: relative change below
``max(tol / 100, 1e-12)``; cap: ``10 * max_iters`` iterations; a diverging iteration, where the
dynamics are not contractive, is cut short, see :meth:`forward`). So the ``backprop`` rule on this
model computes the gradient of the loss at the fixed point by implicit differentiation, the quantity
equilibrium propagation estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

CONVERGENT_ACTIVATIONS = ("hard_sigmoid", "sigmoid")

Nudge = Callable[[Tensor], Tensor]


def _positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def rho(u: Tensor, activation: str) -> Tensor:
    """The unit non-linearity: ``hard_sigmoid`` = clamp to ``[0, 1]``; ``sigmoid`` = ``1/(1+exp(-4(u-1/2)))``.

    The smooth ``sigmoid`` (slope 1 at 1/2, like the hard sigmoid) is holomorphic, so it also
    accepts complex states, as holomorphic EP needs (Laborieux & Zenke 2022).
    """
    if activation == "hard_sigmoid":
        if u.is_complex():
            raise ValueError("the hard sigmoid is not complex-differentiable; use activation='sigmoid' for complex "
                             "(holomorphic) nudges")
        return u.clamp(0.0, 1.0)
    return torch.sigmoid(4.0 * (u - 0.5))


class ConvergentNet(nn.Module):
    """Layered convergent network; see the module docstring for the dynamics.

    Args:
        in_features: input size (inputs of any shape ``(N, ...)`` are flattened).
        hidden: widths of the relaxing layers ``a_1 .. a_L``.
        classes: size of the read-out.
        symmetric: ``True``: feedback through ``W_l^T`` (an energy exists); ``False``: separate
            trainable feedback matrices ``feedback[l]`` (``B``), no weight symmetry.
        activation: ``"hard_sigmoid"`` or ``"sigmoid"`` (needed for complex nudges).
        max_iters: iteration cap of every relaxation and of the adjoint solve.
        tol: convergence criterion (max absolute change of a unit in one sweep).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        classes: int,
        *,
        symmetric: bool = True,
        activation: str = "hard_sigmoid",
        max_iters: int = 20,
        tol: float = 1e-3,
    ) -> None:
        super().__init__()
        _positive_int(in_features, "in_features")
        _positive_int(classes, "classes")
        hidden = list(hidden)
        if not hidden:
            raise ValueError("a convergent network needs at least one hidden layer, got hidden=[]")
        for h in hidden:
            _positive_int(h, "hidden width")
        widths = [in_features, *hidden]
        layers = [nn.Linear(widths[i], widths[i + 1]) for i in range(len(hidden))]
        feedback = None if symmetric else [nn.Linear(hidden[i + 1], hidden[i], bias=False)
                                           for i in range(len(hidden) - 1)]
        self._build(layers, feedback, nn.Linear(hidden[-1], classes), activation, max_iters, tol)

    def _build(self, layers: list[nn.Linear], feedback: list[nn.Linear] | None, readout: nn.Linear,
               activation: str, max_iters: int, tol: float) -> None:
        if activation not in CONVERGENT_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(CONVERGENT_ACTIVATIONS)}")
        _positive_int(max_iters, "max_iters")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        self.layers = nn.ModuleList(layers)
        self.feedback = nn.ModuleList(feedback or [])
        self.symmetric = feedback is None
        self.readout = readout
        self.activation = activation
        self.max_iters = int(max_iters)
        self.tol = float(tol)
        self.last_relaxation: dict[str, float] = {}
        self.last_adjoint: dict[str, float] = {}

    @classmethod
    def from_mlp(cls, mlp: nn.Module, *, symmetric: bool = True, activation: str = "hard_sigmoid",
                 max_iters: int = 20, tol: float = 1e-3) -> ConvergentNet:
        """A convergent network that *shares* the ``nn.Linear`` layers of a feed-forward MLP.

        The MLP's hidden ``Linear`` layers become ``W_0 .. W_{L-1}`` and its last one the read-out;
        its activation modules are not used (the units use ``activation``). Non-symmetric networks
        get new feedback matrices.
        """
        linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
        others = [m for m in mlp.modules() if len(list(m.children())) == 0 and not isinstance(m, nn.Linear)]
        bad = [type(m).__name__ for m in others if not isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout))
               and type(m).__name__ not in ("ReLU", "Tanh", "Sigmoid", "GELU", "LeakyReLU", "ELU")]
        if len(linears) < 2 or bad:
            raise ValueError("equilibrium propagation needs a ConvergentNet (fl.models.convergent) or a plain MLP "
                             f"with at least one hidden layer; got {type(mlp).__name__} "
                             f"with {len(linears)} Linear layer(s){' and ' + ', '.join(bad) if bad else ''}")
        for a, b in zip(linears[:-1], linears[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"MLP layers do not chain ({a.out_features} -> {b.in_features})")
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        hidden = [m.out_features for m in linears[:-1]]
        p = linears[0].weight
        feedback = None if symmetric else [
            nn.Linear(hidden[i + 1], hidden[i], bias=False).to(device=p.device, dtype=p.dtype)
            for i in range(len(hidden) - 1)]
        net._build(linears[:-1], feedback, linears[-1], activation, max_iters, tol)
        return net

    # --- structure ------------------------------------------------------------------------------
    def untie(self) -> ConvergentNet:
        """Make a symmetric network non-symmetric: add trainable feedback matrices ``B_l``, freshly
        initialised (independent of ``W_l``, as ``nn.Linear`` initialises them). Returns ``self``."""
        if self.symmetric:
            w = self.layers[0].weight
            widths = self.widths
            self.feedback = nn.ModuleList(nn.Linear(widths[i + 1], widths[i], bias=False).to(device=w.device,
                                                                                              dtype=w.dtype)
                                          for i in range(len(widths) - 1))
            self.symmetric = False
        return self

    @property
    def widths(self) -> list[int]:
        """Widths of the relaxing layers ``a_1 .. a_L``."""
        return [m.out_features for m in self.layers]

    def _weights(self, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
        """``W_l, b_l`` (input side) and the feedback matrices ``V_l`` (``a_{l+1} -> a_l``) in ``dtype``."""
        W = [m.weight.to(dtype) for m in self.layers]
        b = [m.bias.to(dtype) if m.bias is not None else None for m in self.layers]
        if self.symmetric:
            V = [w.t() for w in W[1:]]
        else:
            V = [m.weight.to(dtype) for m in self.feedback]
        return W, b, V

    def _drive(self, l: int, x: Tensor, a: list[Tensor], Wt: list[Tensor], b: list[Tensor | None],
               Vt: list[Tensor]) -> Tensor:
        """Input of layer ``l``: ``W_{l-1} a_{l-1} + b + V_l a_{l+1}`` (row-major, with transposed weights)."""
        below = x if l == 0 else a[l - 1]
        u = below @ Wt[l] if b[l] is None else torch.addmm(b[l], below, Wt[l])
        if l + 1 < len(a):
            u = torch.addmm(u, a[l + 1], Vt[l])
        return u

    def _transposed(self, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
        W, b, V = self._weights(dtype)
        return [w.t() for w in W], b, [v.t() for v in V]

    # --- dynamics -------------------------------------------------------------------------------
    def init_states(self, x: Tensor, dtype: torch.dtype | None = None) -> list[Tensor]:
        """All-zero states (the usual starting point of the free phase)."""
        dtype = dtype or x.dtype
        return [torch.zeros(x.shape[0], w, dtype=dtype, device=x.device) for w in self.widths]

    @torch.no_grad()
    def relax(
        self,
        x: Tensor,
        states: list[Tensor] | None = None,
        beta: complex | float = 0.0,
        nudge: Nudge | None = None,
        max_iters: int | None = None,
        tol: float | None = None,
    ) -> list[Tensor]:
        """Relax to a fixed point; return the states ``[a_1 .. a_L]``.

        ``nudge(a_L)`` returns ``dl/da_L`` per sample; the top layer's input gets ``-beta * nudge(a_L)``
        (the nudged phase of Scellier & Bengio 2017). ``beta`` may be complex, then the states are complex
        (holomorphic EP). Starts from ``states`` (default: zeros).
        """
        x = x.flatten(1)
        cplx = isinstance(beta, complex) or (states is not None and states[0].is_complex())
        dtype = x.dtype
        if cplx:
            dtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        x = x.to(dtype)
        a = [s.to(dtype).clone() for s in states] if states is not None else self.init_states(x, dtype)
        Wt, b, Vt = self._transposed(dtype)
        cap = self.max_iters if max_iters is None else max_iters
        eps = self.tol if tol is None else tol
        top = len(a) - 1
        it, res = 0, float("inf")
        while it < cap:
            res = 0.0
            for l in range(len(a)):
                u = self._drive(l, x, a, Wt, b, Vt)
                if l == top and nudge is not None and beta != 0:
                    u = u - beta * nudge(a[top])
                new = rho(u, self.activation)
                res = max(res, float((new - a[l]).abs().max()))
                a[l] = new
            it += 1
            if res < eps:
                break
        self.last_relaxation = {"iterations": it, "residual": res, "converged": float(res < eps)}
        return a

    def step(self, x: Tensor, a: list[Tensor]) -> list[Tensor]:
        """One block Gauss-Seidel sweep ``a -> f(a)`` (bottom-up, newest values), differentiable.

        The sweep :meth:`relax` repeats, so it has the same fixed points and, where the relaxation
        converges, a Jacobian of spectral radius below 1: the adjoint iteration of implicit
        differentiation converges at the same rate as the relaxation.
        """
        x = x.flatten(1)
        Wt, b, Vt = self._transposed(x.dtype)
        a = list(a)
        for l in range(len(a)):
            a[l] = rho(self._drive(l, x, a, Wt, b, Vt), self.activation)
        return a

    def scores(self, states: list[Tensor]) -> Tensor:
        """Class scores (read-out of the top layer)."""
        return self.readout(states[-1])

    def forward(self, x: Tensor) -> Tensor:
        """Read-out at the free fixed point; gradients (if enabled) by implicit differentiation."""
        x = x.flatten(1).to(self.readout.weight.dtype)
        a_star = self.relax(x)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return self.scores(a_star)
        sizes = self.widths
        z = torch.cat(self.step(x, a_star), 1)  # = a_star at the fixed point, with the graph to the weights
        z0 = torch.cat(a_star, 1).detach().requires_grad_(True)
        with torch.enable_grad():
            f0 = torch.cat(self.step(x, list(z0.split(sizes, 1))), 1)

        def adjoint(g: Tensor) -> Tensor:
            # solve y = g + (df/da)^T y at the fixed point (implicit function theorem) by iteration;
            # stop when no component changes by more than max(tol/100, 1e-12) relative to the largest.
            # Where the dynamics are not contractive the iteration diverges: it then stops as soon as
            # the change has grown 100-fold over its smallest value and returns the iterate before
            # the smallest change (a truncated Neumann series), flagged in ``last_adjoint``.
            y, best, best_change = g, g, float("inf")
            eps = max(self.tol * 1e-2, 1e-12)
            it, converged = 0, False
            while it < 10 * self.max_iters:
                it += 1
                (jty,) = torch.autograd.grad(f0, z0, y, retain_graph=True)
                new = g + jty
                change = float((new - y).abs().max())
                if not change < 100 * best_change:  # diverging (or NaN)
                    break
                if change < best_change:
                    best, best_change = y, change
                y = new
                if change <= eps * float(new.abs().max()):
                    converged, best = True, y
                    break
            self.last_adjoint = {"iterations": it, "change": best_change, "converged": float(converged)}
            return best

        if z.requires_grad:
            z.register_hook(adjoint)
        return self.scores(list(z.split(sizes, 1)))

    # --- Jacobian of the coupling -------------------------------------------------------------
    def coupling_blocks(self) -> list[tuple[Tensor, Tensor]]:
        """For each pair of adjacent layers ``(l+1, l)``: ``(W_l, V_l)``, the Jacobian blocks ``J[l+1, l]``
        and ``J[l, l+1]`` of the drive with respect to the (activated) states. ``J`` is symmetric iff
        ``V_l = W_l^T`` for every ``l``."""
        W, _, V = self._weights(self.layers[0].weight.dtype)
        return list(zip(W[1:], V))

    def jacobian_asymmetry(self) -> float:
        """``|J_a| / (|J_s| + |J_a|)`` (Frobenius norms) of the symmetric and antisymmetric parts of the
        Jacobian ``J = d drive / d a``: one minus the symmetry score ``|J_s| / (|J_s| + |J_a|)`` of
        Laborieux & Zenke 2024.

        0 for symmetric weights; for this layered network ``J`` does not depend on the state.
        """
        sym = anti = 0.0
        with torch.no_grad():
            for w, v in self.coupling_blocks():
                sym += 2 * float(((w + v.t()) / 2).pow(2).sum())
                anti += 2 * float(((w - v.t()) / 2).pow(2).sum())
        s, a = sym**0.5, anti**0.5
        return a / (s + a) if s + a > 0 else 0.0


def convergent(
    in_features: int,
    hidden: Sequence[int],
    classes: int,
    *,
    symmetric: bool = True,
    activation: str = "hard_sigmoid",
    max_iters: int = 20,
    tol: float = 1e-3,
) -> ConvergentNet:
    """A :class:`ConvergentNet` (the model of the ``ep`` rule)."""
    return ConvergentNet(in_features, hidden, classes, symmetric=symmetric, activation=activation,
                         max_iters=max_iters, tol=tol)
