"""Equilibrium propagation: classic, symmetric-nudge, holomorphic and generalised (no weight symmetry).

The network is a :class:`~forwardlearn.models.ConvergentNet` that relaxes to a fixed point. One
update (Scellier & Bengio 2017; Laborieux & Zenke 2022, 2024, and their reference code
Laborieux-Axel/holomorphic_eqprop and generalized-holo-ep):

1. **free phase**: relax with the input clamped to the fixed point ``a^0``;
2. **nudged phases**: relax again from ``a^0`` with the top layer's input nudged by
   ``-beta_k * dl/da_L`` (``l`` = per-example loss of the read-out), to ``a^k``;
3. **update** from local activity products only. With ``Q(a)`` the product of the post- and
   pre-synaptic activities of every weight (``a_{l+1} a_l^T``; ``a_{l+1}`` for a bias), EP estimates
   ``dL/dtheta = -d/dbeta Q(a^beta)`` at ``beta = 0`` by

   - ``nudges=1`` (classic EP, the learning rule of Scellier & Bengio 2017): ``-(Q(a^beta) - Q(a^0)) / beta``;
   - ``nudges=2`` (symmetric nudging, Laborieux et al. 2021): ``-(Q(a^beta) - Q(a^-beta)) / (2 beta)``;
   - ``nudges=N >= 3`` (holomorphic EP, Laborieux & Zenke 2022): complex nudges
     ``beta_k = |beta| e^{2 pi i k / N}`` on a circle and the discretised Cauchy integral
     ``-(1/N) sum_k Q(a^{beta_k}) / beta_k``, whose error is ``O(|beta|^N)``: a finite nudge still gives
     the exact derivative as ``N`` grows. (Conjugate nudges give conjugate states, so only
     ``floor(N/2) + 1`` phases are run.) Needs a holomorphic unit (``activation="sigmoid"``).

   With symmetric weights (``V_l = W_l^T``) ``Q`` is evaluated on the nudged states on both sides,
   the classic contrastive Hebbian form. Without weight symmetry the rule is generalised EP
   (Laborieux & Zenke 2024): the update is ``-(da/dbeta)^T dF/dtheta`` at the free
   fixed point, i.e. the same estimator applied to ``a_post^beta a_pre^0``, for the feed-forward
   weights ``W`` and the feedback weights ``B`` alike. It equals the true gradient only when the
   Jacobian of the dynamics is symmetric.

The read-out (a feed-forward layer on the top state) gets its own local gradient at the free fixed
point. ``homeostasis=lambda`` adds ``lambda`` times the gradient of the Jacobian homeostatic loss of
Laborieux & Zenke (2024): ``E_eps[|J eps|^2 - eps^T J^2 eps] / n = |J - J^T|_F^2 / (2n)``
at the fixed point, with Gaussian probes ``eps``; it penalises the functional asymmetry of the
Jacobian ``J = d drive / d a`` and drives the network toward the regime where EP is unbiased. Its
gradient is a sum of local outer products of probe responses.

No reverse-mode pass runs across the network: the relaxations, the products and the probe
responses are all forward computations (autograd is used only inside the read-out layer, for its
local gradient and, with a custom loss, for ``dl/da_L``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.convergent import CONVERGENT_ACTIVATIONS, ConvergentNet
from .base import LossFn, Rule, accumulate_grad, check_finite, register

_CACHE = "_ep_convergent"


def _softmax(z: Tensor) -> Tensor:
    """Softmax that also accepts complex logits (a holomorphic function of them)."""
    z = z - z.real.max(dim=1, keepdim=True).values
    e = torch.exp(z)
    return e / e.sum(dim=1, keepdim=True)


def homeostatic_loss_and_grads(net: ConvergentNet, probes: Tensor | list[Tensor]) -> tuple[float, list[Tensor],
                                                                                               list[Tensor]]:
    """The Jacobian homeostatic loss and its gradients for ``W_1 .. W_{L-1}`` and the feedback matrices.

    ``probes``: one ``(M, width_l)`` tensor of probe vectors per layer (or the concatenation). Loss
    ``(1/(n M)) sum_m (|J eps_m|^2 - eps_m^T J J eps_m)`` (Laborieux & Zenke 2024); with
    ``dL/dJ = (2 (J e) e^T - e (J e)^T - (J^T e) e^T) / (n M)`` read off block by block, so every
    gradient is an outer product of a probe and a probe response. Symmetric networks return zeros
    (their ``W`` appear in both blocks and the loss is identically 0).
    """
    widths = net.widths
    eps = list(probes.split(widths, 1)) if isinstance(probes, Tensor) else list(probes)
    L = len(widths)
    n, M = sum(widths), eps[0].shape[0]
    W, _, V = net._weights(eps[0].dtype)
    with torch.no_grad():
        Je = [torch.zeros_like(e) for e in eps]
        JTe = [torch.zeros_like(e) for e in eps]
        for l in range(1, L):  # block J[l, l-1] = W[l]
            Je[l] += eps[l - 1] @ W[l].t()
            JTe[l - 1] += eps[l] @ W[l]
        for l in range(L - 1):  # block J[l, l+1] = V[l]
            Je[l] += eps[l + 1] @ V[l].t()
            JTe[l + 1] += eps[l] @ V[l]
        JJe = [torch.zeros_like(e) for e in eps]
        for l in range(1, L):
            JJe[l] += Je[l - 1] @ W[l].t()
        for l in range(L - 1):
            JJe[l] += Je[l + 1] @ V[l].t()
        value = float(sum((j * j).sum() - (e * jj).sum() for j, e, jj in zip(Je, eps, JJe))) / (n * M)
        scale = 1.0 / (n * M)
        gW = [(2 * Je[l].t() @ eps[l - 1] - eps[l].t() @ Je[l - 1] - JTe[l].t() @ eps[l - 1]) * scale
              for l in range(1, L)]
        gV = [(2 * Je[l].t() @ eps[l + 1] - eps[l].t() @ Je[l + 1] - JTe[l].t() @ eps[l + 1]) * scale
              for l in range(L - 1)]
    if net.symmetric:
        return 0.0, [torch.zeros_like(g) for g in gW], []
    return value, gW, gV


@register
class EquilibriumPropagation(Rule):
    """Equilibrium propagation on a :class:`~forwardlearn.models.ConvergentNet` (see the module docstring).

    Args:
        beta: nudge strength ``|beta| > 0``.
        nudges: 1 = classic one-sided EP, 2 = symmetric ``+-beta``, N >= 3 = holomorphic EP with N
            complex nudges on the circle of radius ``beta`` (needs ``activation="sigmoid"`` and the
            default cross-entropy loss).
        symmetric: weight symmetry. ``None``: the network's own (an MLP converted by :meth:`attach` is
            symmetric); ``False``: :meth:`attach` unties a symmetric network (adds freshly initialised
            feedback matrices, :meth:`ConvergentNet.untie`); ``True`` on a non-symmetric network raises.
        homeostasis: weight of the Jacobian homeostatic loss (0 = off; only non-symmetric nets have it).
        activation: the units, ``"hard_sigmoid"`` or ``"sigmoid"``; set on the network by :meth:`attach`
            (``None``: the network's own; an MLP converted by :meth:`attach` gets ``"sigmoid"`` when
            ``nudges >= 3``, else ``"hard_sigmoid"``).
        loss: per-batch mean loss of the read-out ``loss(scores, targets)``; default cross-entropy.
            Its gradient with respect to the top layer is the nudge.
        seed: seed of the probe vectors of the homeostatic loss.
    """

    name: ClassVar[str] = "ep"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = ("equilibrium propagation on a convergent net: free and nudged relaxations; "
                                  "symmetric, holomorphic and asymmetric variants")
    paper: ClassVar[str] = ("Scellier & Bengio 2017, Equilibrium propagation; Laborieux & Zenke 2022, Holomorphic "
                            "equilibrium propagation computes exact gradients through finite size oscillations; "
                            "Laborieux & Zenke 2024, Improving equilibrium propagation without weight symmetry "
                            "through Jacobian homeostasis")
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 3e-3,
        "epochs": 8,
        "batch_size": 64,
        "hidden": [64, 32],
        "model": "mlp",
    }
    forward_only: ClassVar[bool] = False  # autograd inside the read-out layer only; relaxation is forward

    def __init__(
        self,
        beta: float = 0.5,
        nudges: int = 2,
        symmetric: bool | None = None,
        homeostasis: float = 0.0,
        activation: str | None = None,
        loss: LossFn | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        if isinstance(nudges, bool) or not isinstance(nudges, int) or nudges < 1:
            raise ValueError(f"nudges must be an integer >= 1, got {nudges!r}")
        if nudges >= 3 and loss is not None:
            raise ValueError(f"nudges={nudges} (holomorphic EP) needs a complex-differentiable loss; only the default "
                             "cross-entropy is supported, got a custom loss")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise ValueError(f"symmetric must be True, False or None, got {symmetric!r}")
        if isinstance(homeostasis, bool) or not isinstance(homeostasis, (int, float)) or not (
                math.isfinite(homeostasis) and homeostasis >= 0):
            raise ValueError(f"homeostasis must be a non-negative number, got {homeostasis!r}")
        if activation is not None and activation not in CONVERGENT_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(CONVERGENT_ACTIVATIONS)}")
        if nudges >= 3 and activation == "hard_sigmoid":
            raise ValueError(f"nudges={nudges} (holomorphic EP) needs complex-differentiable units, not "
                             "activation='hard_sigmoid'; use 'sigmoid'")
        self.activation = activation
        self.beta = float(beta)
        self.nudges = nudges
        self.symmetric = symmetric
        self.homeostasis = float(homeostasis)
        self._custom_loss = loss is not None
        self.last_homeostatic_loss = float("nan")

    # --- model --------------------------------------------------------------------------------
    @classmethod
    def model_spec(cls) -> dict[str, Any]:
        """A symmetric hard-sigmoid :class:`ConvergentNet` with ``defaults["hidden"]``."""
        return {"name": "convergent", "hidden": list(cls.defaults["hidden"])}

    def attach(self, model: nn.Module) -> nn.Module:
        """Return the :class:`ConvergentNet` to train.

        A ``ConvergentNet`` is returned itself (with the ``activation`` option applied and, for
        ``symmetric=False``, untied). A plain MLP is converted once (:meth:`ConvergentNet.from_mlp`,
        sharing its ``Linear`` layers) and the result is remembered on the MLP. Build the optimizer
        over the returned network's parameters: feedback matrices exist only there.
        """
        if isinstance(model, ConvergentNet):
            net = model
        elif isinstance(model.__dict__.get(_CACHE), ConvergentNet):
            net = model.__dict__[_CACHE]
        else:
            activation = self.activation or ("sigmoid" if self.nudges >= 3 else "hard_sigmoid")
            net = ConvergentNet.from_mlp(model, symmetric=self.symmetric is not False, activation=activation)
            object.__setattr__(model, _CACHE, net)  # not a sub-module: the MLP's forward is unchanged
        if self.activation is not None:
            net.activation = self.activation
        if self.symmetric is False and net.symmetric:
            net.untie()  # adds the feedback matrices as sub-modules (build the optimizer after attach)
        if self.symmetric is not None and net.symmetric != self.symmetric:
            raise ValueError(f"rule option symmetric={self.symmetric} contradicts the network "
                             f"(symmetric={net.symmetric})")
        if self.nudges >= 3 and net.activation != "sigmoid":
            raise ValueError(f"nudges={self.nudges} (holomorphic EP) needs complex-differentiable units: build the "
                             f"network with activation='sigmoid' (it has {net.activation!r}) or give the rule "
                             "activation='sigmoid'")
        return net

    # --- the rule -----------------------------------------------------------------------------
    def _nudge_fn(self, net: ConvergentNet, targets: Tensor, classes: int):
        """``a_L -> dl/da_L`` per example (sum, not mean, over the batch)."""
        if not self._custom_loss:
            R, c = net.readout.weight, net.readout.bias
            onehot = F.one_hot(targets, classes)

            cache: dict[torch.dtype, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

            def ce(a: Tensor) -> Tensor:
                if a.dtype not in cache:
                    r = R.detach().to(a.dtype)
                    bias = c.detach().to(a.dtype) if c is not None else torch.zeros(r.shape[0], dtype=a.dtype,
                                                                                     device=a.device)
                    cache[a.dtype] = (r, r.t(), bias, onehot.to(a.dtype))
                r, rt, bias, target = cache[a.dtype]
                return (_softmax(torch.addmm(bias, a, rt)) - target) @ r
            return ce

        def custom(a: Tensor) -> Tensor:
            with torch.enable_grad():
                a = a.detach().requires_grad_(True)
                total = self.loss(net.readout(a), targets) * a.shape[0]
                (g,) = torch.autograd.grad(total, a)
            return g
        return custom

    def _phases(self) -> list[tuple[complex | float, complex | float]]:
        """``(beta_k, weight_k)`` with ``d/dbeta Q ~ sum_k Re(weight_k Q(beta_k))`` (a weight on ``beta=0``
        is for the free states)."""
        b, N = self.beta, self.nudges
        if N == 1:
            return [(0.0, -1.0 / b), (b, 1.0 / b)]
        out: list[tuple[complex | float, complex | float]] = [(b, 1.0 / (N * b))]
        if N % 2 == 0:
            out.append((-b, -1.0 / (N * b)))
        for k in range(1, (N + 1) // 2):
            bk = b * complex(math.cos(2 * math.pi * k / N), math.sin(2 * math.pi * k / N))
            out.append((bk, 2.0 / (N * bk)))  # conjugate partner k' = N - k folded in: 2 Re(.)
        return out

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        net = self.attach(model)
        dtype = net.readout.weight.dtype
        x = inputs.flatten(1).to(dtype)
        n = x.shape[0]
        free = net.relax(x)
        iters = [net.last_relaxation["iterations"]]
        # read-out: local gradient at the free fixed point
        top = free[-1].detach()
        rparams = [p for p in net.readout.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.loss(net.readout(top), targets)
            value = check_finite(loss.detach(), "loss")
            for p, g in zip(rparams, torch.autograd.grad(loss, rparams)):
                accumulate_grad(p, g)
        nudge = self._nudge_fn(net, targets, net.readout.out_features)
        L = len(free)
        gW = [torch.zeros_like(m.weight) for m in net.layers]
        gb = [torch.zeros_like(m.bias) if m.bias is not None else None for m in net.layers]
        gV = [torch.zeros_like(m.weight) for m in net.feedback]
        for beta_k, w in self._phases():
            if beta_k == 0.0:
                a = free
            else:
                a = net.relax(x, free, beta=beta_k, nudge=nudge)
                iters.append(net.last_relaxation["iterations"])
            with torch.no_grad():
                for l in range(L):
                    post = a[l] * w
                    pre = x if l == 0 else (a[l - 1] if net.symmetric else free[l - 1])
                    gW[l] -= (post.t() @ pre.to(post.dtype)).real
                    if gb[l] is not None:
                        gb[l] -= post.sum(0).real
                    if not net.symmetric and l + 1 < L:
                        gV[l] -= (post.t() @ free[l + 1].to(post.dtype)).real
        self.last_iterations = iters
        if self.homeostasis > 0 and not net.symmetric:
            g = self.generator(x.device)
            probes = torch.randn(n, sum(net.widths), generator=g, device=x.device, dtype=dtype)
            h, hW, hV = homeostatic_loss_and_grads(net, probes)
            self.last_homeostatic_loss = h
            for l in range(1, L):
                gW[l] = gW[l] + self.homeostasis * n * hW[l - 1]
            for l in range(L - 1):
                gV[l] = gV[l] + self.homeostasis * n * hV[l]
        for m, g in zip(net.layers, gW):
            accumulate_grad(m.weight, g / n)
        for m, g in zip(net.layers, gb):
            if g is not None:
                accumulate_grad(m.bias, g / n)
        for m, g in zip(net.feedback, gV):
            accumulate_grad(m.weight, g / n)
        self.steps += 1
        return value

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Read-out of the free phase's fixed point."""
        net = self.attach(model)
        return net.scores(net.relax(inputs.flatten(1).to(net.readout.weight.dtype)))
