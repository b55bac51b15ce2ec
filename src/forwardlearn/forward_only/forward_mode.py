"""Forward-mode evaluation: the directional derivative of the loss along a tangent, with no backward pass.

:func:`jvp_loss` materialises each layer's tangent only while that layer runs; :func:`sequential_jvp` is a
written-out JVP for plain ``nn.Sequential`` MLPs; :func:`per_example_directional` gives per-example
directional derivatives of a batch loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import Inputs, call_model, logits_of
from ..rules.base import LossFn, trainable_parameters


class RankOne(NamedTuple):
    """A weight tangent ``V = u r^T`` kept as its two factors (``u``: the weight's first dimension,
    ``r``: the rest flattened); :func:`sequential_jvp` uses it without forming ``V``."""

    u: Tensor
    r: Tensor

    def full(self, like: Tensor) -> Tensor:
        """``u r^T`` shaped like the parameter ``like``."""
        return torch.outer(self.u, self.r).to(like.dtype).view_as(like)


Tangent = Tensor | RankOne
TANGENTS = ("full", "rank1")


def _elementwise_jvp(m: nn.Module, z: Tensor, h: Tensor, t: Tensor) -> Tensor | None:
    """Tangent of ``h = m(z)`` along ``t`` for the element-wise layers of :func:`sequential_jvp`
    (``t`` may be overwritten); ``None`` for a layer it does not know."""
    if isinstance(m, nn.ReLU):
        return t.mul_(h > 0)
    if isinstance(m, nn.LeakyReLU):
        return t.mul_(torch.where(z > 0, 1.0, m.negative_slope).to(t.dtype))
    if isinstance(m, nn.Tanh):
        return t.mul_(1 - h * h)
    if isinstance(m, nn.Sigmoid):
        return t.mul_(h * (1 - h))
    return None


_PASS_THROUGH = (nn.Identity, nn.Flatten)
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid)
_FAST_LAYERS = (nn.Linear, nn.Dropout, *_PASS_THROUGH, *_ELEMENTWISE)


def sequential_jvp(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    tangent_of: Callable[[int, nn.Parameter], Tangent | None],
) -> tuple[float, float] | None:
    """:func:`jvp_loss` for the common case, with the tangent rules written out: a ``Sequential`` of
    ``Flatten``/``Linear``/``ReLU``/``LeakyReLU``/``Tanh``/``Sigmoid``/``Identity`` (and ``Dropout`` in
    eval mode) under ``F.cross_entropy`` with class-index targets. ``None`` when the model or the loss is
    anything else (the caller then runs the general forward-mode pass).

    Forward-mode AD by hand (Baydin et al. 2022, Sec. 2): every layer carries the pair ``(h, h')``;
    ``Linear``: ``z' = h W'^T + b' + h' W^T``; element-wise ``f``: ``h' = f'(z) z'``; cross-entropy:
    ``L' = mean_n (softmax(z_n) . z'_n - z'_n[y_n])``. The same matrix products as forward-mode AD, fused
    into ``addmm`` calls without dual-tensor dispatch; each layer's tangent lives only while it runs.
    """
    if type(model) is not nn.Sequential or loss_fn is not F.cross_entropy or not isinstance(inputs, Tensor):
        return None
    if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32) or inputs.dim() < 2:
        return None
    if targets.numel() == 0 or bool((targets < 0).any()):
        return None  # ignore_index and friends: leave them to the general pass
    params = trainable_parameters(model)
    index = {id(p): i for i, p in enumerate(params)}
    for m in model.modules():
        if m is model:
            continue
        if type(m) not in _FAST_LAYERS or m._forward_hooks or m._forward_pre_hooks:
            return None  # exact types only: a subclass may change forward
        if isinstance(m, nn.Dropout) and m.training and m.p > 0:
            return None
        if isinstance(m, nn.LeakyReLU) and (m.inplace or m.negative_slope < 0):
            return None
    g = nn.modules.module
    if model._forward_hooks or model._forward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks:
        return None
    if sum(1 for m in model if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
           if id(p) in index) != len(params):
        return None  # a parameter used outside a Linear
    with torch.no_grad():
        h, t = inputs, None
        for m in model:
            if isinstance(m, nn.Linear):
                w, b = m.weight, m.bias
                tw = tangent_of(index[id(w)], w) if id(w) in index else None
                tb = tangent_of(index[id(b)], b) if b is not None and id(b) in index else None
                z = F.linear(h, w, b)
                tz = None
                if isinstance(tw, RankOne):  # h (u r^T)^T = (h r) u^T: a rank-one update, no matrix product
                    base = tb.to(w.dtype).expand_as(z) if tb is not None else torch.zeros_like(z)
                    tz = torch.addr(base, h @ tw.r.to(w.dtype), tw.u.to(w.dtype))
                elif tw is not None:
                    tw = tw.to(w.dtype).view_as(w)
                    tz = torch.addmm(tb.to(w.dtype), h, tw.t()) if tb is not None else h @ tw.t()
                elif tb is not None:
                    tz = tb.to(w.dtype).expand_as(z).clone()
                del tw, tb
                if t is not None:
                    tz = t @ w.t() if tz is None else tz.addmm_(t, w.t())
                h, t = z, tz
            elif isinstance(m, _ELEMENTWISE):
                out = m(h)
                if t is not None:
                    t = _elementwise_jvp(m, h, out, t)
                h = out
            elif isinstance(m, nn.Flatten):
                h = m(h)
                t = None if t is None else m(t)
            # Identity and eval-mode Dropout: nothing to do
        if h.dim() != 2:
            return None
        logp = torch.log_softmax(h, 1)
        y = targets.long().view(-1, 1)
        loss = -logp.gather(1, y).mean()
        if t is None:
            return float(loss), 0.0
        d = ((logp.exp_() * t).sum(1) - t.gather(1, y).squeeze(1)).mean()
        return float(loss), float(d)


def jvp_loss(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn,
    tangent_of: Callable[[int, nn.Parameter], Tangent | None],
    fast: bool = True,
) -> tuple[float, float]:
    """``(loss, d)`` with ``d = sum_i grad_i . tangent_of(i, p_i)``, by one forward-mode AD pass.

    Plain MLPs under cross-entropy take :func:`sequential_jvp` (the same numbers, written-out tangent
    rules) unless ``fast=False``; everything else goes through ``torch.autograd.forward_ad``:

    Each module's own parameters become dual tensors (primal = the detached weights, tangent =
    ``tangent_of(i, p)``) just before that module runs and are put back right after, so only one
    layer's tangent exists at a time (memory: weights + one parameter-sized tangent + activations).
    Parameters a module's forward never owns while running (used from outside their module) are
    covered by a second, eager pass that makes every parameter dual at once. A failure of forward-mode
    AD is re-raised as ``RuntimeError`` naming the innermost layer that was running. ``tangent_of``
    must be deterministic (a tied parameter asks for its tangent once per module that owns it).

    A :class:`RankOne` tangent ``u r^T`` of the weight of a plain ``nn.Linear`` or ungrouped ``nn.Conv2d`` is
    never formed: the weight stays as it is and a forward hook adds the weight's share of the output
    tangent, ``(x . r) u`` (a convolution: ``x`` against the single kernel ``r``, scaled per channel by
    ``u``), to the layer's output -- the low-rank evaluation inside the layer of
    :mod:`forwardlearn.forward_only.lowrank`.
    """
    if fast:
        out = sequential_jvp(model, inputs, targets, loss_fn, tangent_of)
        if out is not None:
            return out
    params = trainable_parameters(model)
    index = {id(p): i for i, p in enumerate(params)}
    names = {m: n or type(model).__name__ for n, m in model.named_modules()}
    owned: dict[nn.Module, list[str]] = {}
    for m in names:
        own = [k for k, p in m._parameters.items() if p is not None and id(p) in index]
        if own:
            owned[m] = own

    def in_layer(m: nn.Module, k: str) -> bool:  # a rank-one weight tangent added inside the layer's forward
        return k == "weight" and type(m) in (nn.Linear, nn.Conv2d) and getattr(m, "groups", 1) == 1

    def run(eager: bool) -> tuple[float, float, set[int]]:
        stack: list[nn.Module] = []
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        visited: set[int] = set()
        factors: list[RankOne | None] = []  # per running module: its weight's rank-one tangent, added in post

        def swap(m: nn.Module) -> tuple[int, RankOne | None]:
            n, inside = 0, None
            for k in owned.get(m, ()):
                p = m._parameters[k]
                if not isinstance(p, nn.Parameter):  # already dual (module re-entered)
                    continue
                t = tangent_of(index[id(p)], p)  # made when needed, dropped with the layer's dual weights
                visited.add(id(p))
                if t is None:
                    continue
                if isinstance(t, RankOne):
                    if not eager and in_layer(m, k):
                        inside = t
                        continue
                    t = t.full(p)
                m._parameters[k] = fwAD.make_dual(p.detach(), t.detach().to(p.dtype).view_as(p))
                swapped.append((m, k, p))
                n += 1
            return n, inside

        counts: list[int] = []

        def pre(m: nn.Module, args: Any) -> None:
            stack.append(m)
            n, inside = (0, None) if eager else swap(m)
            counts.append(n)
            factors.append(inside)

        def post(m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
            for _ in range(counts.pop()):
                mod, k, p = swapped.pop()
                mod._parameters[k] = p
            stack.pop()
            t = factors.pop()
            if t is None:
                return None
            x = fwAD.unpack_dual(args[0] if args else next(iter(kwargs.values()))).primal
            u = t.u.to(x.dtype)
            if isinstance(m, nn.Conv2d):
                y = m._conv_forward(x, t.r.to(x.dtype).view(1, *m.weight.shape[1:]), None)  # (B, 1, H', W')
                extra = y * u.view(-1, 1, 1)
            else:
                extra = (x.reshape(-1, x.shape[-1]) @ t.r.to(x.dtype)).unsqueeze(1) * u
                extra = extra.view(*x.shape[:-1], u.numel())
            return out + fwAD.make_dual(torch.zeros_like(extra), extra)

        handles = []
        try:
            for m in names:
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post, with_kwargs=True))
            with fwAD.dual_level():
                if eager:
                    for m in owned:
                        swap(m)
                try:
                    loss = loss_fn(logits_of(call_model(model, inputs)), targets)
                except (RuntimeError, NotImplementedError) as e:
                    if stack:
                        m = stack[-1]
                        raise RuntimeError(
                            f"forward-mode AD cannot go through layer {names[m]!r} ({type(m).__name__}): {e}"
                        ) from e
                    raise
                primal, tan = fwAD.unpack_dual(loss)
                d = 0.0 if tan is None else float(tan.detach())
                value = float(primal.detach())
        finally:
            for h in handles:
                h.remove()
            while swapped:
                mod, k, p = swapped.pop()
                mod._parameters[k] = p
        return value, d, visited

    value, d, visited = run(eager=False)
    if len(visited) < len(params):
        value, d, _ = run(eager=True)
    return value, d



def functional_call(model: nn.Module, params: dict[str, Tensor], inputs: Inputs) -> Any:
    """``torch.func.functional_call`` of ``model`` with ``params`` on a tensor or a mapping batch
    (``model(**inputs)`` for a mapping)."""
    if isinstance(inputs, Mapping):
        return torch.func.functional_call(model, params, (), dict(inputs))
    return torch.func.functional_call(model, params, (inputs,))


def per_example_directional(loss_fn: LossFn, outputs: Tensor, targets: Tensor, tangent: Tensor) -> Tensor:
    """``d_n = dL/d outputs[n] . tangent[n]`` for every example ``n``, forward mode only.

    Cross-entropy (mean): one forward-mode pass through ``cross_entropy(..., reduction="none")`` gives
    ``N d_n`` as the per-example tangents. Any other loss: one JVP of the loss per example, batched
    with ``vmap`` over tangents that are zero except on row ``n``; exact for any loss of the whole
    batch (memory ``N * N * C``).
    """
    n = outputs.shape[0]
    if loss_fn is F.cross_entropy:
        with fwAD.dual_level():
            per = F.cross_entropy(fwAD.make_dual(outputs, tangent), targets, reduction="none")
            return fwAD.unpack_dual(per).tangent / n
    eye = torch.eye(n, dtype=outputs.dtype, device=outputs.device).view(n, n, *([1] * (outputs.dim() - 1)))
    masked = eye * tangent.unsqueeze(0)

    def one(t: Tensor) -> Tensor:
        return torch.func.jvp(lambda o: loss_fn(o, targets), (outputs,), (t,))[1]

    return torch.func.vmap(one)(masked)


#: ``forward_gradient`` batches its K tangents in one vmapped pass when K x (number of weights) is at most this
BATCHED_LIMIT = 2**22
