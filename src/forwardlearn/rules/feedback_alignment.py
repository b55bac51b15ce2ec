"""The feedback alignment family: the error travels backward through matrices other than ``W^T``.

- ``fa``: fixed random feedback matrices (Lillicrap et al. 2016).
- ``sign_symmetry``: feedback with the signs of ``W`` (Liao, Leibo & Poggio 2016; scaled as in
  Moskovitz et al. 2018 and BioTorch, Sanfiz & Akrout 2021).
- ``pfa``: product feedback alignment, a learned two-stage feedback ``B R`` (Li & Benna 2024).

Direct feedback alignment (``dfa``, Nøkland 2016), which sends the output error straight to every block,
is in :mod:`forwardlearn.rules.direct_feedback_alignment` and shares the rule bookkeeping of this module.

FA, sign symmetry and PFA share the layers of :mod:`forwardlearn.rules.feedback_parts` (one
:class:`torch.autograd.Function` per layer type, re-exported here): ``attach`` turns the model's
``nn.Linear`` / ``nn.Conv2d`` layers into :class:`FeedbackLinear` / :class:`FeedbackConv2d` in place, and
``grads`` runs ``loss.backward()`` inside :func:`feedback_active`, so the error follows the feedback. The
feedback matrices are non-persistent buffers of those layers (PFA's ``R`` is a parameter) and are saved in
the *rule's* ``state_dict``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Rule, accumulate_grad, check_finite, register
from .feedback_parts import (
    _SWAP,
    FeedbackConv2d,
    FeedbackConv2dFn,
    FeedbackLinear,
    FeedbackLinearFn,
    effective_feedback,
    feedback_active,
    feedback_layers,
)

__all__ = [
    "FeedbackAlignment",
    "FeedbackConv2d",
    "FeedbackConv2dFn",
    "FeedbackLinear",
    "FeedbackLinearFn",
    "ProductFeedbackAlignment",
    "SignSymmetry",
    "effective_feedback",
    "feedback_active",
    "feedback_layers",
]


# --- the rules --------------------------------------------------------------------------------------
def _fan_in(weight: Tensor) -> int:
    return weight[0].numel()


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


class _TrackedFeedback(Rule):
    """Shared bookkeeping: the feedback lives on the model, the rule's ``state_dict`` carries it."""

    def __init__(self, loss: Any = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self._model_ref: weakref.ref[nn.Module] | None = None
        self._pending: dict[str, Tensor] = {}

    def _model(self) -> nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    def _track(self, model: nn.Module, fresh: bool) -> None:
        # a deep copy of an attached model (e.g. inside diagnostics) does not take over the rule's state
        if fresh or self._model() is None:
            self._model_ref = weakref.ref(model)

    def _feedback_state(self, model: nn.Module) -> dict[str, Tensor]:
        raise NotImplementedError

    def _load_feedback(self, model: nn.Module, fb: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        model = self._model()
        fb = self._feedback_state(model) if model is not None else dict(self._pending)
        state["feedback"] = {k: v.detach().clone() for k, v in fb.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        fb = dict(state.get("feedback", {}))
        model = self._model()
        if model is None:
            self._pending = fb
        else:
            self._load_feedback(model, fb)


class _LayerFeedbackRule(_TrackedFeedback):
    """FA, sign symmetry and PFA: swap the layers, then ``loss.backward()`` follows the feedback."""

    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-3, "epochs": 20, "batch_size": 64, "hidden": [256], "model": "mlp",
    }

    def __init__(self, scale: float = 1.0, loss: Any = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.scale = _check_scale(scale)
        self._pending_bounds: dict[str, float] = {}

    @property
    def mode(self) -> str:
        raise NotImplementedError

    # feedback construction, per layer
    def _initial_bound(self, weight: Tensor) -> float:
        """``scale * sqrt(3) * rms(W)``: a uniform ``U(-a, a)`` then has the root-mean-square of ``W`` (``|B| ~ |W|``).

        With PyTorch's default initialisation this is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; a layer of
        zeros falls back to that bound.
        """
        rms = float(weight.detach().double().pow(2).mean().sqrt())
        a = math.sqrt(3.0) * rms if rms > 0 and math.isfinite(rms) else 1.0 / math.sqrt(_fan_in(weight))
        return self.scale * a

    def _uniform(self, shape: torch.Size | tuple[int, ...], low: float, high: float, like: Tensor) -> Tensor:
        g = self.generator(like.device)
        u = torch.rand(shape, generator=g, device=like.device, dtype=like.dtype)
        return low + (high - low) * u

    def _setup(self, name: str, m: FeedbackLinear | FeedbackConv2d, saved: Tensor | None) -> None:
        """Create the layer's feedback buffers (non-persistent: the rule's ``state_dict`` saves them).

        ``saved``: the layer's feedback from a loaded ``state_dict``; then nothing is drawn, so the
        random stream stays where the checkpoint left it.
        """
        raise NotImplementedError

    def _draw_or(self, saved: Tensor | None, shape: tuple[int, ...], low: float, high: float, like: Tensor) -> Tensor:
        if saved is None:
            return self._uniform(shape, low, high, like)
        if tuple(saved.shape) != tuple(shape):
            raise ValueError(f"{self.name}: saved feedback has shape {tuple(saved.shape)}, the layer needs {shape}")
        return saved.to(device=like.device, dtype=like.dtype).clone()

    def _ready(self, m: nn.Module) -> bool:
        return isinstance(m, (FeedbackLinear, FeedbackConv2d)) and m.fb_mode == self.mode

    def attach(self, model: nn.Module) -> nn.Module:
        fresh = False
        found = False
        for name, m in model.named_modules():
            if self._ready(m):
                found = True
                continue
            base = type(m)
            if isinstance(m, (FeedbackLinear, FeedbackConv2d)):  # attached by another feedback rule
                base = nn.Linear if isinstance(m, FeedbackLinear) else nn.Conv2d
                for attr in ("feedback", "feedback_r"):
                    if attr in m._buffers:
                        del m._buffers[attr]
                    if attr in m._parameters:
                        del m._parameters[attr]
            if base not in _SWAP:
                continue
            m.__class__ = _SWAP[base]
            m.fb_mode = self.mode
            bound = self._pending_bounds.pop(name, None)
            m.fb_bound = float(bound) if bound is not None else self._initial_bound(m.weight)
            m.fb_scale = m.fb_bound / math.sqrt(3.0)  # the rms of W at attach (times scale): uSF's magnitude
            self._setup(name, m, self._pending.pop(name, None))
            found = fresh = True
        if not found:
            raise ValueError(f"{self.name} found no nn.Linear or nn.Conv2d layer to attach to")
        self._track(model, fresh)
        return model

    def _feedback_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {name: m.feedback for name, m in feedback_layers(model) if "feedback" in m._buffers}

    def _load_feedback(self, model: nn.Module, fb: dict[str, Tensor]) -> None:
        layers = dict(feedback_layers(model))
        for name, t in fb.items():
            if name not in layers or "feedback" not in layers[name]._buffers:
                raise ValueError(f"{self.name}: saved feedback for layer {name!r}, which the model does not have")
            buf = layers[name].feedback
            if buf.shape != t.shape:
                raise ValueError(f"{self.name}: feedback for {name!r} has shape {tuple(t.shape)}, "
                                 f"the layer needs {tuple(buf.shape)}")
            buf.copy_(t)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        model = self._model()
        if model is None:
            state["feedback_bounds"] = dict(self._pending_bounds)
        else:
            state["feedback_bounds"] = {name: float(m.fb_bound) for name, m in feedback_layers(model)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        bounds = {k: float(v) for k, v in state.get("feedback_bounds", {}).items()}
        model = self._model()
        if model is None:
            self._pending_bounds = bounds
            return
        layers = dict(feedback_layers(model))
        for name, b in bounds.items():
            if name in layers:
                layers[name].fb_bound = b
                layers[name].fb_scale = b / math.sqrt(3.0)

    def _before_step(self, model: nn.Module) -> None:
        """Hook run before the forward pass of every :meth:`grads` call."""

    def _after_backward(self, model: nn.Module) -> None:
        """Hook run after the backward pass of every :meth:`grads` call."""

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        if self._model() is None:
            self._model_ref = weakref.ref(model)
        self._before_step(model)
        with feedback_active():
            loss = self.loss(model(inputs), targets)
            value = check_finite(loss.detach(), "loss")
            loss.backward()
        self._after_backward(model)
        self.steps += 1
        return value


@register
class FeedbackAlignment(_LayerFeedbackRule):
    """Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, Nat. Commun. 7:13276).

    The error reaching layer ``l`` is ``delta_l = (delta_{l+1} B_{l+1}) * f'(a_l)`` with a fixed random
    ``B`` of ``W``'s shape in place of ``W``, drawn from ``U(-a, a)`` with ``a = s sqrt(3) rms(W)`` at
    attach time (``scale`` ``s``): ``B`` has the size of ``W`` (with PyTorch's default initialisation,
    ``a = s/sqrt(fan_in)``: ``B`` is drawn like ``W``, as in the paper).
    """

    name: ClassVar[str] = "fa"
    backward: ClassVar[str] = "feedback"
    description: ClassVar[str] = "feedback alignment: the error flows back through fixed random matrices"
    paper: ClassVar[str] = ("Lillicrap, Cownden, Tweed & Akerman 2016, Random synaptic feedback weights support "
                            "error backpropagation for deep learning, Nat. Commun. 7:13276")

    @property
    def mode(self) -> str:
        return "fa"

    def _setup(self, name: str, m: FeedbackLinear | FeedbackConv2d, saved: Tensor | None) -> None:
        a = m.fb_bound
        m.register_buffer("feedback", self._draw_or(saved, tuple(m.weight.shape), -a, a, m.weight.detach()),
                          persistent=False)


@register
class SignSymmetry(_LayerFeedbackRule):
    """Sign-concordant feedback (Liao, Leibo & Poggio 2016, AAAI): ``B = M o sign(W)``.

    - ``usf`` (uniform): ``|M| = s rms(W)`` of ``W`` at attach time (with PyTorch's default init, the
      init's std ``1/sqrt(3 fan_in)``), the scaled sign feedback of Moskovitz et al. 2018 and BioTorch;
      the signs follow ``W`` at every step.
    - ``brsf`` (batchwise random magnitude): ``|M| ~ U(0, s sqrt(3) rms(W))`` redrawn before every batch.
    - ``frsf`` (fixed random magnitude): the same ``|M|`` drawn once.
    """

    name: ClassVar[str] = "sign_symmetry"
    backward: ClassVar[str] = "feedback"
    description: ClassVar[str] = "sign symmetry: feedback with the signs of W (variants usf, brsf, frsf)"
    paper: ClassVar[str] = ("Liao, Leibo & Poggio 2016, How important is weight symmetry in backpropagation?, AAAI; "
                            "Moskovitz, Litwin-Kumar & Abbott 2018, Feedback alignment in deep convolutional networks")

    def __init__(self, variant: str = "usf", scale: float = 1.0, loss: Any = None, seed: int | None = None) -> None:
        if variant not in ("usf", "brsf", "frsf"):
            raise ValueError(f"variant must be 'usf', 'brsf' or 'frsf', got {variant!r}")
        super().__init__(scale=scale, loss=loss, seed=seed)
        self.variant = variant

    @property
    def mode(self) -> str:
        return self.variant

    def _setup(self, name: str, m: FeedbackLinear | FeedbackConv2d, saved: Tensor | None) -> None:
        if self.variant != "usf":
            mag = self._draw_or(saved, tuple(m.weight.shape), 0.0, m.fb_bound, m.weight.detach())
            m.register_buffer("feedback", mag, persistent=False)

    @torch.no_grad()
    def _before_step(self, model: nn.Module) -> None:
        if self.variant == "brsf":
            for _, m in feedback_layers(model):
                m.feedback.uniform_(0.0, m.fb_bound, generator=self.generator(m.feedback.device))


@register
class ProductFeedbackAlignment(_LayerFeedbackRule):
    """Product feedback alignment (Li & Benna 2024, Deep Learning without Weight Symmetry).

    The error of layer ``l+1`` first reaches an intermediate population of ``expand_ratio x`` its size
    through a fixed random ``B`` (``r = delta B``, ``B B^T ~ I``: entries of variance ``1/n_mid``), then
    layer ``l`` through a learned ``R``: ``delta_l = (delta_{l+1} B R) * f'(a_l)``. ``R`` is a parameter
    of the layer (``feedback_r``, initialised like the layer's ``W``, times ``scale``) whose gradient is
    ``dR = r^T x = B^T dW``; with the ``weight_decay`` ``lambda`` that this rule adds to the gradient of
    both ``W`` and ``R``, ``R - B^T W`` decays to zero, so ``B R -> B B^T W ~ W`` (the PFA-with-weight-decay
    setting, as in Kolen & Pollack 1994). Use SGD: the relation ``dR = B^T dW`` survives momentum but not
    Adam's per-coordinate scaling. The input layer sends no feedback, so its ``R`` is not trained.
    """

    name: ClassVar[str] = "pfa"
    backward: ClassVar[str] = "feedback"
    description: ClassVar[str] = "product feedback alignment: feedback through a fixed B and a learned R"
    paper: ClassVar[str] = "Li & Benna 2024, Deep Learning without Weight Symmetry, arXiv:2405.20594"
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 0.05, "epochs": 15, "batch_size": 64, "hidden": [256], "model": "mlp",
    }

    def __init__(self, expand_ratio: int = 10, weight_decay: float = 1e-3, scale: float = 1.0, loss: Any = None,
                 seed: int | None = None) -> None:
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, int) or expand_ratio < 1:
            raise ValueError(f"expand_ratio must be a positive integer, got {expand_ratio!r}")
        if (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
                or not (weight_decay >= 0 and math.isfinite(weight_decay))):
            raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
        super().__init__(scale=scale, loss=loss, seed=seed)
        self.expand_ratio = expand_ratio
        self.weight_decay = float(weight_decay)

    @property
    def mode(self) -> str:
        return "pfa"

    def _setup(self, name: str, m: FeedbackLinear | FeedbackConv2d, saved: Tensor | None) -> None:
        if isinstance(m, FeedbackConv2d) and m.groups != 1:
            raise ValueError(f"pfa supports Conv2d with groups=1 only (layer {name!r} has groups={m.groups})")
        w = m.weight.detach()
        n_out = w.shape[0]
        n_mid = n_out * self.expand_ratio
        b_bound = math.sqrt(3.0 / n_mid)  # uniform with variance 1/n_mid, so that B B^T ~ I
        m.register_buffer("feedback", self._draw_or(saved, (n_out, n_mid), -b_bound, b_bound, w), persistent=False)
        a = m.fb_bound
        r_shape = (n_mid, *w.shape[1:])
        # R is a parameter (in the model's state_dict): after a checkpoint load it is not drawn either
        r = self._uniform(r_shape, -a, a, w) if saved is None else torch.zeros(r_shape, device=w.device, dtype=w.dtype)
        m.feedback_r = nn.Parameter(r)

    def untrained(self, model: nn.Module) -> set[str]:
        """``R`` of the first layer: that layer sends no error below, so its ``R`` carries no feedback and gets
        no gradient."""
        first = next(feedback_layers(model), None)
        return {f"{first[0]}.feedback_r"} if first is not None else set()

    def _after_backward(self, model: nn.Module) -> None:
        if self.weight_decay == 0:
            return
        with torch.no_grad():
            for _, m in feedback_layers(model):
                for p in (m.weight, m.feedback_r):
                    if p.grad is not None:
                        accumulate_grad(p, self.weight_decay * p)
