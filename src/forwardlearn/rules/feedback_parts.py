"""The layers of the feedback alignment family: the error travels backward through a matrix other than ``W``.

One :class:`torch.autograd.Function` per layer type (:class:`FeedbackLinearFn`, :class:`FeedbackConv2dFn`)
serves FA, sign symmetry and PFA (:mod:`forwardlearn.rules.feedback_alignment`). Its forward is the
ordinary layer; its backward computes the weight and bias gradients exactly and sends ``g_in = g_mid F`` to
the layer below, where ``g_mid = g`` and ``F`` is the feedback matrix (FA, sign symmetry), or ``g_mid = g B``
and ``F = R`` (PFA, Li & Benna 2024). A rule's ``attach`` turns the model's ``nn.Linear`` / ``nn.Conv2d``
layers into :class:`FeedbackLinear` / :class:`FeedbackConv2d` in place (same object, same parameter names
and ``state_dict`` keys). Inside :func:`feedback_active` a plain ``loss.backward()`` follows the feedback;
outside it the layers differentiate exactly, so the reference gradient of
``forwardlearn.diagnostics.gradient_alignment`` stays the true one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeedbackConv2d",
    "FeedbackConv2dFn",
    "FeedbackLinear",
    "FeedbackLinearFn",
    "effective_feedback",
    "feedback_active",
    "feedback_layers",
]


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
