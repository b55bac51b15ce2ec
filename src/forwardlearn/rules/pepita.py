"""PEPITA: error-driven input modulation (Dellaferrera & Kreiman 2022), as characterised by Srinivasan
et al. 2023, "Forward Learning with Top-Down Feedback: Empirical and Analytical Characterization of
Biologically-Plausible Learning Rules" (ICLR 2023), with its weight-decay and weight-mirroring variants.

Per batch (Dellaferrera & Kreiman 2022, Algorithm 1; the update equations of Srinivasan et al. 2023):

1. standard pass ``h_l = f(W_l h_{l-1})``, ``h_0 = x``; output error ``e = h_L - target``;
2. the error projected onto the input by a fixed random matrix: ``x_mod = x - F e`` (the sign of the
   later paper's code; immaterial for a random, symmetric ``F``, and the error-reducing one for a
   mirrored ``F``);
3. modulated pass ``h_l^mod = f(W_l h_{l-1}^mod)`` from ``h_0^mod = x_mod``;
4. updates ``dW_l = (h_l - h_l^mod) (h_{l-1}^mod)^T`` for hidden layers and ``dW_L = e (h_{L-1}^mod)^T``
   for the output layer, averaged over the batch and applied as ``W -= lr * dW`` (here: written into
   ``.grad`` for any ``torch.optim`` optimizer).

No reverse-mode pass runs across the network. The only derivative taken is of the loss with respect to
the network's output vector, ``e = N * dL/dy`` (for the default cross-entropy exactly
``softmax(y) - onehot``, the paper's softmax output error).

Any other feed-forward model (convolutional nets, which both papers also train; residual nets,
transformers) takes the same two passes with forward hooks on its layers: every ``Linear``/``Conv2d`` (and
any module with a ``local_weight_grads(x, g)`` method) gets ``g_l = z_l - z_l^mod``, the difference of its
*own output* between the two passes (before the activation, as the activation is not a layer one can hook
in general), and the output layer ``g_L = e``; the update is the layer's local formula with its modulated
input (:func:`~forwardlearn.forward_only.local.layer_weight_grads`), for a convolution averaged over its output
positions (Dellaferrera & Kreiman 2022's convolutional code, ``compute_delta_w_conv``; a sum would make a
convolution's step as many times larger as it has output positions, 64 on 8x8 digits). Parameters of other
modules are not trained by this rule and keep ``.grad = None``: normalisation layers stay at their initial
scale and shift (their difference signal made training unstable in our runs), and attention's input projection,
which ``nn.MultiheadAttention`` applies without calling a submodule, stays at its initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import first_tensor
from ..data.batches import call_model
from ..forward_only.local import FORMULA, NORMS, accumulate_layer, has_formula, layer_weight_grads
from ..models.basic import he_uniform_
from .base import LossFn, Rule, accumulate_grad, check_finite, register
from .forward_forward_parts import mlp_blocks

__all__ = ["Pepita", "he_uniform_", "lr_schedule"]


def lr_schedule(epochs: int, milestones: tuple[float, ...] = (0.6, 0.9), gamma: float = 0.1
                ) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """The papers' learning-rate schedule as a ``forwardlearn.train(scheduler=...)`` factory.

    The learning rate is multiplied by ``gamma`` after the given fractions of ``epochs`` (100 epochs:
    after epochs 60 and 90, as in both papers).
    """
    steps = sorted({max(1, round(f * epochs)) for f in milestones})
    return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=gamma)


def _number(v: Any, what: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{what} must be a {'positive' if positive else 'non-negative'} number, got {v!r}")
    return float(v)


@register
class Pepita(Rule):
    """PEPITA: two forward passes, the second on the error-modulated input (on MLPs exactly the papers'
    rule; on other feed-forward models through layer hooks, see the module docstring).

    Args:
        feedback_scale: scale of the projection matrix ``F`` (``d_in x C``). Fixed ``F``: entries
            ``feedback_scale * U(-sqrt(6/d_in), sqrt(6/d_in))`` (the papers' 0.05). With ``mirror=True``
            ``F`` is a product of one matrix per layer whose entries are normal with the per-matrix std
            that gives ``F`` the std ``feedback_scale * sqrt(2/d_in)`` (as in Srinivasan et al. 2023).
        weight_decay: L2 weight decay added to the weights' update (the "PEPITA + weight decay" variant;
            the later paper uses 1e-4).
        mirror: (MLPs only) learn ``F`` by weight mirroring (Akrout et al. 2019, as in Srinivasan et al. 2023):
            layer ``l``'s feedback matrix ``B_l`` moves towards ``E[x f(W_l x)^T]`` for zero-mean
            noise ``x`` (so towards ``W_l^T``), with weight decay, and ``F = B_1 ... B_L`` is rescaled to
            its initial std after each mirroring step.
        mirror_lr, mirror_weight_decay, mirror_noise: the mirroring step size, its weight decay and the
            noise amplitude (the authors' 0.01, 1e-4 and 0.1).
        mirror_every: mirror every ``mirror_every`` steps (1: every step).
        premirror_steps: steps at the start that only mirror and leave the weights alone (the authors
            pre-mirror for two epochs).
        loss, seed: see :class:`~forwardlearn.rules.base.Rule`; the output error is ``N * dloss/doutput``.

    Defaults train digits with plain SGD (momentum 0.9); for the papers' 100-epoch runs pass
    ``scheduler=lr_schedule(100)`` to :func:`forwardlearn.train`. :meth:`default_model` builds the MLP
    with the papers' initialisation (:func:`he_uniform_`).
    """

    name: ClassVar[str] = "pepita"
    backward: ClassVar[str] = "none"
    description: ClassVar[str] = "PEPITA: second forward pass on the input modulated by the projected output error"
    paper: ClassVar[str] = (
        "Dellaferrera & Kreiman 2022 (ICML), Error-driven Input Modulation: Solving the Credit Assignment "
        "Problem without a Backward Pass; Srinivasan et al. 2023 (ICLR), Forward Learning with Top-Down Feedback"
    )
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.01,
        "epochs": 15,
        "batch_size": 64,
        "hidden": [1024],
        "model": "mlp",
    }
    forward_only: ClassVar[bool] = True

    def __init__(
        self,
        feedback_scale: float = 0.05,
        weight_decay: float = 0.0,
        mirror: bool = False,
        mirror_lr: float = 0.01,
        mirror_weight_decay: float = 1e-4,
        mirror_noise: float = 0.1,
        mirror_every: int = 1,
        premirror_steps: int = 0,
        loss: LossFn | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed)
        self.feedback_scale = _number(feedback_scale, "feedback_scale", positive=True)
        self.weight_decay = _number(weight_decay, "weight_decay")
        if not isinstance(mirror, bool):
            raise ValueError(f"mirror must be True or False, got {mirror!r}")
        self.mirror = mirror
        self.mirror_lr = _number(mirror_lr, "mirror_lr", positive=True)
        self.mirror_weight_decay = _number(mirror_weight_decay, "mirror_weight_decay")
        self.mirror_noise = _number(mirror_noise, "mirror_noise", positive=True)
        for key, val, low in (("mirror_every", mirror_every, 1), ("premirror_steps", premirror_steps, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {val!r}")
        self.mirror_every = mirror_every
        self.premirror_steps = premirror_steps
        #: the feedback: ``[F]`` (``d_in x C``) when fixed, ``[B_1, ..., B_L]`` when mirrored
        self.feedback: list[Tensor] = []
        self._walk: tuple[Any, tuple[list[nn.Module], nn.Linear]] | None = None

    @classmethod
    def model_spec(cls) -> dict[str, Any]:
        """The MLP of ``defaults`` with the papers' He-uniform initialisation and zero biases."""
        return {**super().model_spec(), "init": "he_uniform"}

    # --- feedback -------------------------------------------------------------------------------
    def _layers(self, model: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
        key = (id(model), tuple(id(m) for m in model.children()))
        if self._walk is None or self._walk[0] != key:
            blocks, head = mlp_blocks(model)
            self._walk = (key, (list(blocks), head))
        return self._walk[1]

    def _make_feedback(self, model: nn.Module) -> None:
        blocks, head = self._layers(model)
        linears = [b[0] for b in blocks] + [head]
        d_in, classes = linears[0].in_features, head.out_features
        gen = self.generator("cpu")  # created on the CPU so the matrices do not depend on the device
        if not self.mirror:
            limit = math.sqrt(6.0 / d_in) * self.feedback_scale
            self.feedback = [(torch.rand(d_in, classes, generator=gen) * 2 - 1) * limit]
            return
        n = len(linears)
        hidden = math.prod(m.out_features for m in linears[:-1])
        std = (math.sqrt(2.0 / d_in) * self.feedback_scale / math.sqrt(hidden)) ** (1.0 / n)
        self.feedback = [torch.randn(m.in_features, m.out_features, generator=gen) * std for m in linears]

    def _check_feedback(self, model: nn.Module) -> None:
        blocks, head = self._layers(model)
        linears = [b[0] for b in blocks] + [head]
        want = [(linears[0].in_features, head.out_features)] if not self.mirror else [
            (m.in_features, m.out_features) for m in linears]
        if [tuple(f.shape) for f in self.feedback] != want:
            if self.feedback:
                raise ValueError(f"pepita: this rule's feedback matrices {[tuple(f.shape) for f in self.feedback]} "
                                 f"do not fit the model (needs {want}); use a fresh rule per model")
            self._make_feedback(model)

    def projection(self) -> Tensor:
        """``F`` (``d_in x C``): the fixed matrix, or the product of the mirrored ones."""
        f = self.feedback[0]
        for b in self.feedback[1:]:
            f = f @ b
        return f

    def _target_std(self) -> float:
        d_in = self.feedback[0].shape[0]
        return math.sqrt(2.0 / d_in) * self.feedback_scale

    @torch.no_grad()
    def _mirror_step(self, blocks: list[nn.Module], head: nn.Linear, batch: int, device: torch.device) -> None:
        """Weight mirroring: ``B_l += lr (E[x f(W_l x)^T] - wd B_l)``, then restore ``std(F)``."""
        gen = self.generator(device)
        layers: list[nn.Module] = [*blocks, head]
        for b, layer in zip(self.feedback, layers):
            lin = layer if isinstance(layer, nn.Linear) else layer[0]
            noise = torch.randn(batch, lin.in_features, generator=gen, device=device, dtype=lin.weight.dtype)
            noise = (noise - noise.mean()) * self.mirror_noise
            out = layer(noise)
            update = (noise.t() @ out / batch).to(b)
            b.add_(update - self.mirror_weight_decay * b, alpha=self.mirror_lr)
        scale = (self._target_std() / float(self.projection().std())) ** (1.0 / len(self.feedback))
        for b in self.feedback:
            b.mul_(scale)

    # --- the contract ---------------------------------------------------------------------------
    def _is_mlp(self, model: nn.Module) -> bool:
        try:
            self._layers(model)
        except ValueError:
            return False
        return True

    def attach(self, model: nn.Module) -> nn.Module:
        if self._is_mlp(model):
            self._check_feedback(model)
        else:
            if self.mirror:
                raise ValueError(f"pepita: mirror=True (weight mirroring) needs an MLP of Linear layers, got "
                                 f"{type(model).__name__}")
            self._units(model)
        return model

    def _units(self, model: nn.Module) -> list[nn.Module]:
        units = [m for m in model.modules() if has_formula(m) and not isinstance(m, NORMS)
                 and any(p.requires_grad for p in m.parameters(recurse=False))]
        if not units:
            raise ValueError(f"pepita: {type(model).__name__} has no Linear or Conv2d layer to train")
        return units

    def _output_error(self, out: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, e)`` with ``e = N dL/dy``: a derivative with respect to the output vector only."""
        n = out.shape[0]
        if self.loss is F.cross_entropy and targets.dtype == torch.long and targets.dim() == 1:
            with torch.no_grad():
                logp = torch.log_softmax(out, 1)
                loss = F.nll_loss(logp, targets)
                e = logp.exp_()
                e[torch.arange(n, device=e.device), targets] -= 1.0  # softmax(y) - onehot
            return loss, e
        y = out.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(y, targets)
            (e,) = torch.autograd.grad(loss, y)
        return loss, e * n

    def _grads_hooked(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        """Any feed-forward model: both passes with hooks on the layers (module docstring)."""
        units = self._units(model)
        n = inputs.shape[0]
        rec: list[list[tuple[nn.Module, Tensor, Tensor]]] = [[], []]
        which = [0]

        def hook(m: nn.Module, args: Any, out: Any) -> None:
            rec[which[0]].append((m, args[0].detach(), first_tensor(out).detach()))

        handles = [m.register_forward_hook(hook) for m in units]
        try:
            with torch.no_grad():
                out = first_tensor(call_model(model, inputs)).detach()
            loss, e = self._output_error(out, targets)
            value = check_finite(loss.detach(), "loss")
            d_in, classes = inputs[0].numel(), e.shape[1]
            if [tuple(f.shape) for f in self.feedback] != [(d_in, classes)]:
                if self.feedback:
                    raise ValueError(f"pepita: this rule's feedback matrix {tuple(self.feedback[0].shape)} does not "
                                     f"fit the model (needs {(d_in, classes)}); use a fresh rule per model")
                limit = math.sqrt(6.0 / d_in) * self.feedback_scale
                self.feedback = [(torch.rand(d_in, classes, generator=self.generator("cpu")) * 2 - 1) * limit]
            f = self.feedback[0].to(e.device, e.dtype)
            buffers = {k: b.clone() for k, b in model.named_buffers()}  # the second pass leaves no statistics
            which[0] = 1
            with torch.no_grad():
                call_model(model, inputs - (e @ f.t()).view_as(inputs))
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
        finally:
            for h in handles:
                h.remove()
        if [m for m, _, _ in rec[0]] != [m for m, _, _ in rec[1]]:
            raise ValueError("pepita: the two passes ran different layers; the model must be feed-forward")
        with torch.no_grad():
            for (m, _, z), (_, xm, zm) in zip(rec[0], rec[1]):
                g = e if z is out or z.data_ptr() == out.data_ptr() else z - zm
                if isinstance(m, nn.Conv2d):  # the mean over output positions, as the papers' convolutional code
                    g = g / (g.shape[-1] * g.shape[-2])
                grads = layer_weight_grads(m, xm, g / n) if isinstance(m, FORMULA) else m.local_weight_grads(xm, g / n)
                if self.weight_decay and "weight" in grads and grads["weight"].shape == m.weight.shape:
                    grads["weight"] = grads["weight"].add(m.weight.detach(), alpha=self.weight_decay)
                accumulate_layer(m, grads)
        return value

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        if not self._is_mlp(model):
            value = self._grads_hooked(model, inputs, targets)
            self.steps += 1
            return value
        blocks, head = self._layers(model)
        self._check_feedback(model)
        dev = head.weight.device
        self.feedback = [f.to(dev) for f in self.feedback]
        n = inputs.shape[0]
        x = inputs.flatten(1)
        with torch.no_grad():
            acts = []
            h = x
            for block in blocks:
                h = block(h)
                acts.append(h)
            out = head(h)
        loss, e = self._output_error(out, targets)
        value = check_finite(loss.detach(), "loss")
        mirror_now = self.mirror and (self.steps < self.premirror_steps or self.steps % self.mirror_every == 0)
        if self.steps >= self.premirror_steps:
            with torch.no_grad():
                xm = x - e @ self.projection().t().to(e.dtype)
                prev = xm
                for block, a in zip(blocks, acts):
                    hm = block(prev)
                    lin = block[0]
                    d = a - hm
                    self._accumulate(lin, d.t() @ prev / n, d.mean(0))
                    prev = hm
                self._accumulate(head, e.t() @ prev / n, e.mean(0))
        if mirror_now:
            self._mirror_step(blocks, head, n, dev)
        self.steps += 1
        return value

    def _accumulate(self, lin: nn.Linear, gw: Tensor, gb: Tensor) -> None:
        if self.weight_decay:
            gw = gw.add(lin.weight.detach(), alpha=self.weight_decay)
        for p, g in ((lin.weight, gw), (lin.bias, gb)):
            if p is None or not p.requires_grad:
                continue
            if p.grad is None and g.dtype == p.dtype and g.device == p.device:
                p.grad = g  # a fresh tensor made here: no copy needed
            else:
                accumulate_grad(p, g)

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s["feedback"] = [f.detach().cpu().clone() for f in self.feedback]
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.feedback = [f.clone() for f in state.get("feedback", [])]
