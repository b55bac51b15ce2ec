"""The feedback alignment family: the error travels backward through matrices other than ``W^T``.

- ``fa``: fixed random feedback matrices (Lillicrap et al. 2016).
- ``sign_symmetry``: feedback with the signs of ``W`` (Liao, Leibo & Poggio 2016; scaled as in
  Moskovitz et al. 2018 and BioTorch, Sanfiz & Akrout 2021).
- ``pfa``: product feedback alignment, a learned two-stage feedback ``B R`` (Li & Benna 2024).
- ``dfa``: the output error sent straight to every hidden layer (Nøkland 2016).

FA, sign symmetry and PFA share one :class:`torch.autograd.Function` per layer type
(:class:`FeedbackLinearFn`, :class:`FeedbackConv2dFn`). Its forward is the ordinary layer; its backward
computes the weight and bias gradients exactly and sends ``g_in = g_mid F`` to the layer below, where
``g_mid = g`` and ``F`` is the feedback matrix (FA, sign symmetry), or ``g_mid = g B`` and ``F = R``
(PFA). ``attach`` turns the model's ``nn.Linear`` / ``nn.Conv2d`` layers into :class:`FeedbackLinear` /
:class:`FeedbackConv2d` in place (same object, same parameter names and ``state_dict`` keys).
Inside :func:`feedback_active` (which ``grads`` enters) a plain ``loss.backward()`` follows the
rule; outside it the layers differentiate exactly, so the reference gradient of
``forwardlearn.diagnostics.gradient_alignment`` stays the true one. The feedback matrices are
non-persistent buffers of those layers (PFA's ``R`` is a parameter) and are saved in the *rule's*
``state_dict``.

DFA uses no backward chain across blocks: each chosen block (by default every residual block, transformer
layer, else every weighted layer; :mod:`forwardlearn.blocks`) runs on a detached input, and the tensor it
hands on receives ``e B_l`` where ``e`` is the output error.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec, cut_forward, select_blocks
from .base import Rule, accumulate_grad, check_finite, register

__all__ = [
    "DFA",
    "FeedbackAlignment",
    "FeedbackConv2d",
    "FeedbackConv2dFn",
    "FeedbackLinear",
    "FeedbackLinearFn",
    "ProductFeedbackAlignment",
    "SignSymmetry",
    "dfa_blocks",
    "dfa_feedback",
    "effective_feedback",
    "feedback_active",
    "feedback_layers",
]

_MODES = ("fa", "usf", "brsf", "frsf", "pfa")


# --- the shared autograd Functions ------------------------------------------------------------------
def _premultiply(rows: int, n_out: int, n_mid: int, n_in: int, need_fb: bool) -> bool:
    """PFA: is ``dx = g (B R)``, ``dR = B^T dW`` cheaper than ``dx = (g B) R``, ``dR = (g B)^T x``?

    Both orders give the same numbers (associativity; ``dW = g^T x``). Per step, the first costs
    ``n_out n_mid n_in`` (+ as much again for ``dR``) plus ``rows n_out n_in``, independent of the
    ``expand_ratio`` in its batch term; the second ``rows n_mid (n_out + n_in (1 + need_fb))``. Convolutions
    (``rows`` = batch x positions) and large batches favour the first, narrow batches of wide layers the second.
    """
    pre = n_out * n_mid * n_in * (1 + need_fb) + rows * n_out * n_in
    direct = rows * n_mid * (n_out + n_in * (1 + need_fb))
    return pre < direct


class FeedbackLinearFn(torch.autograd.Function):
    """``y = x W^T + b``; backward: ``dW = g^T x``, ``db = sum g``, ``dx = g_mid F``.

    ``g_mid = g`` when ``mid`` is ``None`` (``F`` has the shape of ``W``), else ``g_mid = g B`` with
    ``B = mid`` (PFA, ``F = R``); then ``dR = g_mid^T x`` (Li & Benna 2024: the learning rule of R),
    computed as ``dx = g (B R)`` and ``dR = B^T dW`` when that is cheaper (:func:`_premultiply`).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, fb: Tensor,
                mid: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, fb, mid)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # first order only (no double backward)
        x, fb, mid = ctx.saved_tensors
        need_x, need_w, need_b, need_fb, _ = ctx.needs_input_grad
        shape = g.shape
        if g.dim() != 2:
            g = g.reshape(-1, shape[-1])
            x = x.reshape(-1, x.shape[-1])
        if x.dtype != g.dtype:  # mixed precision
            x, fb = x.to(g.dtype), fb.to(g.dtype)
            mid = mid.to(g.dtype) if mid is not None else None
        gx = gfb = gw = None
        if mid is not None and need_x and _premultiply(g.shape[0], mid.shape[0], mid.shape[1], fb.shape[1],
                                                       need_fb):
            gx = g.mm(mid.mm(fb))
            if need_fb or need_w:
                gw = g.t().mm(x)
            if need_fb:
                gfb = mid.t().mm(gw)
            if not need_w:
                gw = None
        else:
            g_mid = g if mid is None else g.mm(mid)
            if need_x:
                gx = g_mid.mm(fb)
                if need_fb:  # PFA: R carries feedback only when the layer sends a signal to the layer below
                    gfb = g_mid.t().mm(x)
            gw = g.t().mm(x) if need_w else None
        if gx is not None and len(shape) != 2:
            gx = gx.reshape(*shape[:-1], fb.shape[-1])
        gb = g.sum(0) if need_b else None
        return gx, gw, gb, gfb, None


class FeedbackConv2dFn(torch.autograd.Function):
    """``Conv2d`` with the same backward as :class:`FeedbackLinearFn`: ``dx`` is the transposed
    convolution of ``g_mid`` with ``F``; weight and bias gradients are exact. For PFA, ``B`` is a
    ``1x1`` convolution from the layer's channels to the intermediate population (``g_mid = g * B``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, fb: Tensor, mid: Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int) -> Tensor:
        ctx.conf = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, fb, mid)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # first order only (no double backward)
        x, weight, fb, mid = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        x = x.to(g.dtype)
        bias_sizes = [g.shape[1]] if ctx.has_bias else None
        conv_bwd = torch.ops.aten.convolution_backward
        if mid is None:
            # one call: dx uses the feedback kernel, dW only needs the kernel's shape
            gx, gw, gb = conv_bwd(g, x, fb.to(g.dtype), bias_sizes, stride, padding, dilation, False, [0, 0],
                                  groups, [need_x, need_w, need_b and ctx.has_bias])
            return gx, gw, gb, None, None, None, None, None, None
        _, gw, gb = conv_bwd(g, x, weight.to(g.dtype), bias_sizes, stride, padding, dilation, False, [0, 0],
                             groups, [False, need_w, need_b and ctx.has_bias])
        gx = gfb = None
        if need_x:
            mid = mid.to(g.dtype)
            n_out, n_mid = mid.shape
            rows = g.numel() // n_out  # batch x output positions
            if _premultiply(rows, n_out, n_mid, fb[0].numel(), need_fb):
                # dx through the kernel B R, dR = B^T dW: no pass at the n_mid channels at all
                kernel = mid.mm(fb.to(g.dtype).reshape(n_mid, -1)).view(n_out, *fb.shape[1:])
                if need_fb and gw is None:
                    _, gw_all, _ = conv_bwd(g, x, weight.to(g.dtype), None, stride, padding, dilation, False,
                                            [0, 0], groups, [False, True, False])
                else:
                    gw_all = gw
                gx, _, _ = conv_bwd(g, x, kernel, None, stride, padding, dilation, False, [0, 0], groups,
                                    [True, False, False])
                if need_fb:
                    gfb = mid.t().mm(gw_all.reshape(n_out, -1)).view_as(fb)
            else:
                g_mid = torch.einsum("nohw,om->nmhw", g, mid)
                gx, gfb, _ = conv_bwd(g_mid, x, fb.to(g.dtype), None, stride, padding, dilation, False, [0, 0],
                                      groups, [True, need_fb, False])
        return gx, gw, gb, gfb, None, None, None, None, None


# --- layers that call them ----------------------------------------------------------------------------
_STATE = threading.local()


@contextmanager
def feedback_active() -> Iterator[None]:
    """Within this block, attached layers send their error through the feedback matrices."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _use_feedback() -> bool:
    return getattr(_STATE, "depth", 0) > 0 and torch.is_grad_enabled()


def _fan_in(weight: Tensor) -> int:
    return weight[0].numel()


def _feedback_operands(m: FeedbackLinear | FeedbackConv2d) -> tuple[Tensor, Tensor | None]:
    """``(F, B)`` for the Function: the matrix that replaces ``W`` in ``dx``, and PFA's ``B`` (else None)."""
    mode = m.fb_mode
    if mode == "fa":
        return m.feedback, None
    if mode == "pfa":
        return m.feedback_r, m.feedback
    sign = torch.sign(m.weight.detach())
    if mode == "usf":
        return sign.mul_(m.fb_scale), None
    return sign.mul_(m.feedback), None  # brsf / frsf: |M| o sign(W)


class FeedbackLinear(nn.Linear):
    """``nn.Linear`` whose error signal to the layer below goes through a feedback matrix (see module doc)."""

    fb_mode: str
    fb_bound: float
    fb_scale: float

    def forward(self, x: Tensor) -> Tensor:
        if not _use_feedback():
            return F.linear(x, self.weight, self.bias)
        fb, mid = _feedback_operands(self)
        return FeedbackLinearFn.apply(x, self.weight, self.bias, fb, mid)


class FeedbackConv2d(nn.Conv2d):
    """``nn.Conv2d`` counterpart of :class:`FeedbackLinear` (any stride, padding, padding mode, dilation)."""

    fb_mode: str
    fb_bound: float
    fb_scale: float

    def forward(self, x: Tensor) -> Tensor:
        if not _use_feedback():
            return self._conv_forward(x, self.weight, self.bias)
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        fb, mid = _feedback_operands(self)
        return FeedbackConv2dFn.apply(x, self.weight, self.bias, fb, mid, self.stride, padding, self.dilation,
                                      self.groups)


_SWAP: dict[type, type] = {nn.Linear: FeedbackLinear, nn.Conv2d: FeedbackConv2d}


def feedback_layers(model: nn.Module) -> Iterator[tuple[str, FeedbackLinear | FeedbackConv2d]]:
    """``(name, layer)`` for every layer of ``model`` that a feedback rule has attached to."""
    for name, m in model.named_modules():
        if isinstance(m, (FeedbackLinear, FeedbackConv2d)):
            yield name, m


@torch.no_grad()
def effective_feedback(layer: FeedbackLinear | FeedbackConv2d) -> Tensor:
    """The matrix that stands where backprop would use ``W``, with ``W``'s shape (PFA: ``B R``)."""
    fb, mid = _feedback_operands(layer)
    if mid is None:
        return fb.detach().clone()
    if fb.dim() == 2:
        return mid @ fb
    return torch.einsum("om,mikl->oikl", mid, fb)


# --- DFA structure ---------------------------------------------------------------------------------
def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def dfa_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """Split an ``nn.Sequential`` into blocks that each start at a ``Linear``/``Conv2d`` layer.

    Modules before the first weighted layer (``Flatten``, say) join the first block; the last block
    holds the output layer. Raises ``ValueError`` for other models.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"dfa needs an nn.Sequential model (it splits it into layers), got {type(model).__name__}")
    blocks: list[list[nn.Module]] = []
    prefix: list[nn.Module] = []
    for m in _leaves(model):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            blocks.append(prefix + [m])
            prefix = []
        elif blocks:
            blocks[-1].append(m)
        else:
            prefix.append(m)
    if not blocks:
        raise ValueError("dfa found no nn.Linear or nn.Conv2d layer in the model")
    if prefix:
        blocks[-1].extend(prefix)
    return blocks


def _dfa_name(i: int) -> str:
    return f"dfa_feedback_{i}"


def dfa_feedback(model: nn.Module) -> dict[int, Tensor]:
    """DFA's feedback matrices ``{hidden block index: B_l (classes, units)}`` stored on ``model``."""
    out = {}
    for name, buf in model.named_buffers(recurse=False):
        if name.startswith("dfa_feedback_"):
            out[int(name.rsplit("_", 1)[1])] = buf
    return out


# --- the rules --------------------------------------------------------------------------------------
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


@register
class DFA(_TrackedFeedback):
    """Direct feedback alignment (Nøkland 2016, NeurIPS): ``delta a_l = (B_l e) * f'(a_l)``; on transformers
    as in Launay, Poli, Boniface & Krzakala 2020 (NeurIPS), "Direct Feedback Alignment Scales to Modern Deep
    Learning Tasks and Architectures".

    The model is cut at the input of every chosen block (``blocks=``, see
    :func:`forwardlearn.blocks.select_blocks`; default: every residual block and transformer layer, else
    every ``Linear``/``Conv2d``): each block runs on a detached input (a forward pre-hook), so no gradient
    crosses a block boundary. A segment is a block plus what runs after it up to the next block's input
    (activation, pooling, normalisation); the tensor ``h_l`` entering the next block receives ``e B_l``,
    where ``e = dL/dy`` is the output error, and autograd runs inside the segment only (local). The last
    segment (the output layer) gets its exact gradient from ``e``. ``B_l`` is fixed and random
    (``classes x units``, Xavier-uniform ``U(-a, a)``, ``a = s sqrt(6 / (classes + units))`` as in
    BioTorch, so that wide early layers do not receive larger signals than backprop would give them);
    for a token sequence ``(N, T, E)`` one ``B_l`` (``classes x E``) serves every token, so the number of
    tokens may vary. ``B_l`` is created at the first :meth:`grads` call, when the sizes are known, and
    stored on the model as buffer ``dfa_feedback_<l>`` (``l`` counts cuts in execution order). On an
    ``nn.Sequential`` MLP this is Nøkland's DFA layer by layer.

    ``local_loss_hook(k, loss_k) -> loss_k``: if set, applied to segment ``k``'s local objective
    ``sum(h_k * e B_k)`` (the last segment's: the loss) before its backward pass (used by the locality tests).
    """

    name: ClassVar[str] = "dfa"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = "direct feedback alignment: the output error sent to each layer by fixed random maps"
    paper: ClassVar[str] = ("Nøkland 2016, Direct Feedback Alignment Provides Learning in Deep Neural Networks, "
                            "NeurIPS; Launay et al. 2020, Direct Feedback Alignment Scales to Modern Deep "
                            "Learning Tasks and Architectures, NeurIPS")
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-3, "epochs": 20, "batch_size": 64, "hidden": [256], "model": "mlp",
    }
    forward_only: ClassVar[bool] = False  # autograd inside each block (and through the loss) only

    def __init__(self, scale: float = 1.0, blocks: BlockSpec = None, loss: Any = None,
                 seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.scale = _check_scale(scale)
        self.blocks = check_block_spec(blocks)
        self.local_loss_hook: Callable[[int, Tensor], Tensor] | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        select_blocks(model, self.blocks, self.name)  # validates the choice
        fresh = not dfa_feedback(model)
        if fresh and self._pending:
            self._load_feedback(model, self._pending)
            self._pending = {}
        self._track(model, fresh)
        return model

    def _feedback_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {str(i): b for i, b in dfa_feedback(model).items()}

    def _load_feedback(self, model: nn.Module, fb: dict[str, Tensor]) -> None:
        ref = next(iter(model.parameters()), None)
        for key, t in fb.items():
            t = t.to(ref.device) if ref is not None else t
            name = _dfa_name(int(key))
            if name in model._buffers:
                model._buffers[name].copy_(t)
            else:
                model.register_buffer(name, t.clone(), persistent=False)

    def _feedback_for(self, model: nn.Module, i: int, classes: int, units: int, like: Tensor) -> Tensor:
        name = _dfa_name(i)
        b = model._buffers.get(name)
        if b is None or b.shape != (classes, units):
            a = self.scale * math.sqrt(6.0 / (classes + units))
            u = torch.rand((classes, units), generator=self.generator(like.device), device=like.device,
                           dtype=like.dtype)
            model.register_buffer(name, (2 * u - 1) * a, persistent=False)
            b = model._buffers[name]
        return b

    def signal(self, model: nn.Module, i: int, e: Tensor, h: Tensor) -> Tensor:
        """``e B_i`` shaped like ``h`` (the tensor entering the next block; tokens share ``B_i``)."""
        e2 = e.reshape(e.shape[0], -1)
        if h.dim() == 3:  # (N, T, E): one feedback for every token
            b = self._feedback_for(model, i, e2.shape[1], h.shape[-1], h)
            return (e2 @ b.to(e2.dtype)).unsqueeze(1).expand_as(h)
        b = self._feedback_for(model, i, e2.shape[1], h[0].numel(), h)
        return (e2 @ b.to(e2.dtype)).view_as(h)

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        if self._model() is None:
            self._model_ref = weakref.ref(model)
        y, cuts = cut_forward(model, inputs, select_blocks(model, self.blocks, self.name))
        loss = self.loss(y, targets)
        value = check_finite(loss.detach(), "loss")
        hook = self.local_loss_hook
        (e,) = torch.autograd.grad(loss, y, retain_graph=hook is not None)  # the output error, through the loss only
        signals = [self.signal(model, i, e, h) for i, (_, h) in enumerate(cuts)]
        if hook is None:
            torch.autograd.backward([y, *(h for _, h in cuts)], [e, *signals])
        else:
            local = [hook(i, (h * s).sum()) for i, ((_, h), s) in enumerate(zip(cuts, signals))]
            torch.autograd.backward([*local, hook(len(cuts), loss)])
        self.steps += 1
        return value
