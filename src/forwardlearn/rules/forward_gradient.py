"""Forward gradients: the gradient estimated from directional derivatives computed by forward-mode AD.

Three rules share this file:

- ``forward_gradient`` (Baydin et al. 2022): weight perturbation, ``g = (grad . v) v``;
- ``activity_forward_gradient`` (Ren et al. 2022): perturb every layer's output instead of its weights;
- ``local_forward_gradient`` (Fournier et al. 2023): the guess is the gradient of a small local loss.

It also holds the helpers of the forward-only family: random directions regenerated from integer seeds,
chunk by chunk (:class:`Directions`), a forward-mode pass that materialises each layer's tangent only
while that layer runs (:func:`jvp_loss`), and the per-layer weight gradient of a ``Linear``/``Conv2d``
layer from its input and an output signal (:func:`layer_weight_grads`).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossFn, Rule, accumulate_grad, check_finite, register, trainable_parameters

# --- seeds and random directions ---------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_BITS = 31  # torch's int32 random_() fills bits 0..30
_WORDS = 16384  #: random int32 words per chunk
CHUNK = _WORDS * _BITS  #: elements per generated chunk (507904 signs, 1.9 MiB: stays in the L2/L3 cache)
_SHIFTS: dict[torch.device, Tensor] = {}
_SIGN = -(2**31)  # int32 with only the sign bit set
_ONE = 0x3F800000  # bit pattern of float32 1.0
DISTRIBUTIONS = ("rademacher", "gaussian")
TANGENTS = ("full", "rank1")


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for chunk ``index`` of direction ``seed`` (SplitMix64 finaliser)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def draw_seeds(generator: torch.Generator, k: int) -> list[int]:
    """``k`` per-direction integer seeds from the rule's own (CPU) stream."""
    return [int(s) for s in torch.randint(0, 2**62, (k,), generator=generator).tolist()]


def _offsets(numels: list[int]) -> list[int]:
    """Where each parameter starts in the concatenation of all of them, and the total: ``[0, n0, n0+n1, ...]``."""
    return [0, *itertools.accumulate(numels)]


def _spans(offsets: list[int], c0: int, c1: int, first: int, last: int) -> Iterator[tuple[int, int, int]]:
    """``(i, a, b)`` for each parameter ``first <= i < last`` whose range meets ``[c0, c1)``; ``[a, b)`` is the
    non-empty overlap, in positions of the concatenation."""
    i = max(first, bisect.bisect_right(offsets, c0) - 1)
    while i < last and offsets[i] < c1:
        a, b = max(offsets[i], c0), min(offsets[i + 1], c1)
        if b > a:
            yield i, a, b
        i += 1


class Directions:
    """Random directions ``z`` over the trained parameters, regenerated from an integer seed.

    ``z`` lives on the concatenation of the flattened parameters (in ``model.parameters()`` order),
    cut into chunks of :data:`CHUNK` elements; chunk ``j`` of direction ``seed`` is the stream of a
    generator seeded with ``mix_seed(seed, j)``. Nothing is stored: the same seed gives the
    bit-identical direction on the same machine and torch build, any chunk can be made on its own
    (so a parameter's slice costs only its chunks), and no temporary is larger than one chunk.

    ``rademacher`` (+-1, the symmetric Bernoulli of SPSA, Spall 1992) is made from random 31-bit
    words: each bit becomes the sign bit of a float32 ``1.0``, i.e. 1/31 of a random draw per element
    plus three integer passes over a cache-resident chunk. ``gaussian`` uses ``normal_`` (float32).
    Both have ``E[z] = 0`` and ``E[z z^T] = I``, all the unbiasedness of the estimators needs.

    Speed: a sweep over the weights costs a few kernel launches per chunk, so chunks are large enough
    (:data:`CHUNK`) for the launches to vanish and for each operation to run on every thread, yet small
    enough to stay in cache; :meth:`pieces` writes every chunk of a sweep into one buffer.
    """

    def __init__(self, distribution: str = "rademacher") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution
        self._cache: tuple[int, int, torch.device, Tensor] | None = None

    def chunk(self, seed: int, j: int, m: int, device: torch.device, out: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
        """Chunk ``j`` (``m`` elements, float32) of direction ``seed``: a fresh tensor, or a view of
        ``out`` (a buffer of at least ``CHUNK`` float32-sized elements, overwritten)."""
        g = generator if generator is not None else torch.Generator(device=device)
        g.manual_seed(mix_seed(seed, j))
        if self.distribution == "gaussian":
            z = torch.empty(m, device=device) if out is None else out.view(torch.float32).view(-1)[:m]
            return z.normal_(generator=g)
        if device not in _SHIFTS:
            _SHIFTS[device] = torch.arange(1, _BITS + 1, dtype=torch.int32, device=device).unsqueeze(1)
        w = -(-m // _BITS)  # ceil(m / 31) words
        words = torch.empty(w, dtype=torch.int32, device=device).random_(generator=g)  # bits 0..30 fair
        if out is None:
            bits = torch.bitwise_left_shift(words, _SHIFTS[device])  # (31, w): bit 31-b moves to the sign bit
        else:
            bits = out.view(torch.int32).view(-1)[: _BITS * w].view(_BITS, w)
            torch.bitwise_left_shift(words, _SHIFTS[device], out=bits)
        bits.bitwise_and_(_SIGN).bitwise_or_(_ONE)
        return bits.view(torch.float32).view(-1)[:m]

    def pieces(self, seed: int, numels: list[int], device: torch.device,
               only: int | None = None) -> Iterator[tuple[int, int, int, Tensor]]:
        """Yield ``(i, start, stop, z_i[start:stop])`` (float32) covering every parameter (or only ``only``).

        Every chunk of one call is written into the same buffer: a yielded piece is valid until the
        iterator advances past its chunk (copy it to keep it)."""
        offsets = _offsets(numels)
        total = offsets[-1]
        first, last = (0, len(numels)) if only is None else (only, only + 1)
        buf: Tensor | None = None
        gen: torch.Generator | None = None
        for j in range(offsets[first] // CHUNK, -(-offsets[last] // CHUNK)):
            c0 = j * CHUNK
            m = min(CHUNK, total - c0)
            key = (seed, j, device)
            if self._cache is not None and self._cache[:3] == key:
                z = self._cache[3]
            else:
                if buf is None:
                    buf = torch.empty(_BITS * -(-min(CHUNK, total) // _BITS), device=device)  # room for any chunk
                    gen = torch.Generator(device=device)
                z = self.chunk(seed, j, m, device, out=buf, generator=gen)
                self._cache = (*key, z)
            for i, a, b in _spans(offsets, c0, c0 + m, first, last):
                yield i, a - offsets[i], b - offsets[i], z[a - c0 : b - c0]

    def add_terms_(self, flats: list[Tensor], terms: list[tuple[int, float]], decay: float = 1.0,
                   overwrite: list[bool] | None = None) -> None:
        """``flats[i] <- decay * flats[i] + sum_k alpha_k z_k`` in place for ``terms = [(seed_k, alpha_k)]``.

        One sweep over the parameters: for every chunk, each direction's piece is made in turn in a single
        shared buffer and added at once, so the temporary memory is one chunk whatever ``len(terms)``.
        Where ``overwrite[i]``, the first term is written instead of added (``flats[i]`` is a fresh buffer:
        its contents and ``decay`` are ignored)."""
        if not flats:
            return
        offsets = _offsets([f.numel() for f in flats])
        total = offsets[-1]
        device = flats[0].device
        buf = torch.empty(_BITS * -(-min(CHUNK, total) // _BITS), device=device)
        gen = torch.Generator(device=device)
        is_fresh = overwrite or [False] * len(flats)
        for j in range(-(-total // CHUNK)):
            c0 = j * CHUNK
            m = min(CHUNK, total - c0)
            slices = [(flats[i][a - offsets[i] : b - offsets[i]], a - c0, b - c0, is_fresh[i])
                      for i, a, b in _spans(offsets, c0, c0 + m, 0, len(flats))]
            if decay != 1.0:
                for f, _, _, fresh in slices:
                    if not fresh:
                        f.mul_(decay)
            for k, (seed, alpha) in enumerate(terms):
                z = self.chunk(seed, j, m, device, out=buf, generator=gen)
                for f, a, b, fresh in slices:
                    piece = z[a:b]
                    piece = piece if piece.dtype == f.dtype else piece.to(f.dtype)
                    if fresh and k == 0:
                        torch.mul(piece, alpha, out=f)
                    else:
                        f.add_(piece, alpha=alpha)

    def param(self, seed: int, numels: list[int], i: int, like: Tensor) -> Tensor:
        """The slice of direction ``seed`` on parameter ``i`` as a tensor shaped like ``like``."""
        out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        for _, a, b, z in self.pieces(seed, numels, like.device, only=i):
            out[a:b].copy_(z)
        return out.view_as(like)

    def add_(self, flats: list[Tensor], seed: int, alpha: float, overwrite: list[bool] | None = None) -> None:
        """``flats[i] += alpha * z_i`` in place for every parameter, chunk by chunk (``flats[i] = alpha * z_i``
        where ``overwrite[i]``: no need to zero a fresh buffer first)."""
        self.add_terms_(flats, [(seed, alpha)], overwrite=overwrite)


def flat_view(t: Tensor, what: str) -> Tensor:
    """A 1-D view of a contiguous tensor (parameters and gradients are updated through it)."""
    if not t.is_contiguous():
        raise ValueError(f"{what} is not contiguous; forward-only rules update parameters in place through a flat view")
    return t.detach().view(-1)


def accumulate_directions(params: list[nn.Parameter], directions: Directions, seeds: list[int],
                          scalars: Tensor) -> None:
    """``p.grad += mean_k scalars[k] * z_k`` for every parameter, regenerating each ``z_k`` from its seed."""
    if len(seeds) != len(scalars):
        raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
    if not params:
        return
    coefs = [float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
    if not seeds:
        return
    fresh = [p.grad is None for p in params]
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    grads = [flat_view(p.grad, f"the gradient of parameter {i}") for i, p in enumerate(params)]
    directions.add_terms_(grads, list(zip(seeds, coefs)), overwrite=fresh)  # one sweep for all K directions


def _check_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


# --- forward-mode pass with per-layer tangents ------------------------------------------------------


class RankOne(NamedTuple):
    """A weight tangent ``V = u r^T`` kept as its two factors (``u``: the weight's first dimension,
    ``r``: the rest flattened); :func:`sequential_jvp` uses it without forming ``V``."""

    u: Tensor
    r: Tensor

    def full(self, like: Tensor) -> Tensor:
        """``u r^T`` shaped like the parameter ``like``."""
        return torch.outer(self.u, self.r).to(like.dtype).view_as(like)


Tangent = Tensor | RankOne


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
    if type(model) is not nn.Sequential or loss_fn is not F.cross_entropy:
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
    inputs: Tensor,
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

    def tangent(p: nn.Parameter) -> Tensor | None:  # made when needed, dropped with the layer's dual weights
        t = tangent_of(index[id(p)], p)
        return t.full(p) if isinstance(t, RankOne) else t

    def run(eager: bool) -> tuple[float, float, set[int]]:
        stack: list[nn.Module] = []
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        visited: set[int] = set()

        def swap(m: nn.Module) -> int:
            n = 0
            for k in owned.get(m, ()):
                p = m._parameters[k]
                if not isinstance(p, nn.Parameter):  # already dual (module re-entered)
                    continue
                t = tangent(p)
                visited.add(id(p))
                if t is None:
                    continue
                m._parameters[k] = fwAD.make_dual(p.detach(), t.detach().to(p.dtype).view_as(p))
                swapped.append((m, k, p))
                n += 1
            return n

        counts: list[int] = []

        def pre(m: nn.Module, args: Any) -> None:
            stack.append(m)
            counts.append(0 if eager else swap(m))

        def post(m: nn.Module, args: Any, out: Any) -> None:
            for _ in range(counts.pop()):
                mod, k, p = swapped.pop()
                mod._parameters[k] = p
            stack.pop()

        handles = []
        try:
            for m in names:
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            with fwAD.dual_level():
                if eager:
                    for m in owned:
                        swap(m)
                try:
                    loss = loss_fn(model(inputs), targets)
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


# --- per-layer weight gradients from a local signal ------------------------------------------------

PERTURBABLE = (nn.Linear, nn.Conv2d)
#: ``forward_gradient`` batches its K tangents in one vmapped pass when K x (number of weights) is at most this
BATCHED_LIMIT = 2**22


def perturbable_layers(model: nn.Module, rule: str) -> list[tuple[str, nn.Module]]:
    """The ``Linear``/``Conv2d`` layers of ``model``; any other layer with trained parameters is an error."""
    out = []
    for name, m in model.named_modules():
        own = [k for k, p in m._parameters.items() if p is not None and p.requires_grad]
        if not own:
            continue
        if not isinstance(m, PERTURBABLE):
            raise ValueError(
                f"{rule} perturbs the outputs of Linear and Conv2d layers only; layer {name!r} "
                f"({type(m).__name__}) has trained parameters {own}"
            )
        if isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            raise ValueError(f"{rule}: layer {name!r} uses padding={m.padding!r}/{m.padding_mode!r}; "
                             "only numeric zero padding is supported")
        out.append((name, m))
    if not out:
        raise ValueError(f"{rule}: the model has no Linear or Conv2d layer with trained parameters")
    return out


def layer_weight_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Gradient of ``sum(g * module(x))`` w.r.t. the layer's weight and bias, by the layer's own formula.

    ``Linear``: ``g^T x`` and ``sum_n g``; ``Conv2d``: the weight-gradient convolution of ``x`` with
    ``g`` (``torch.nn.grad.conv2d_weight``, a single kernel call, no autograd) and ``sum g`` over batch
    and space. This is the local part of a layer's update: input and output signal of one layer only.
    """
    out: dict[str, Tensor] = {}
    if isinstance(module, nn.Linear):
        g2 = g.reshape(-1, module.out_features)
        out["weight"] = g2.t().mm(x.reshape(-1, module.in_features))
        if module.bias is not None:
            out["bias"] = g2.sum(0)
    elif isinstance(module, nn.Conv2d):
        out["weight"] = torch.nn.grad.conv2d_weight(
            x, module.weight.shape, g, module.stride, module.padding, module.dilation, module.groups
        )
        if module.bias is not None:
            out["bias"] = g.sum((0, 2, 3))
    else:  # pragma: no cover - guarded by perturbable_layers
        raise ValueError(f"no local weight gradient for {type(module).__name__}")
    return out


def give_grad(p: nn.Parameter, g: Tensor) -> None:
    """``p.grad += g`` like :func:`accumulate_grad`, but a fresh ``g`` this rule owns becomes ``p.grad``
    without a copy when there is none yet (saves one parameter-sized buffer at the peak)."""
    if p.grad is None and g.dtype == p.dtype and g.device == p.device and g.shape == p.shape and g.is_contiguous():
        p.grad = g.detach()
    else:
        accumulate_grad(p, g)


def _accumulate_layer(module: nn.Module, grads: dict[str, Tensor]) -> None:
    for k, g in grads.items():
        p = module._parameters[k]
        if p is not None and p.requires_grad:
            give_grad(p, g)


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


# --- the rules ---------------------------------------------------------------------------------------


@register
class ForwardGradient(Rule):
    """Forward gradient, weight perturbation (Baydin et al. 2022, Sec. 3, Eq. 1 and Theorem 1).

    For ``K = directions`` tangents ``v_k`` over all trained parameters (``E[v v^T] = I``), one
    forward-mode AD pass each gives the directional derivative ``d_k = grad L . v_k`` (no backward
    pass); the estimate ``g = (1/K) sum_k d_k v_k`` is unbiased. Tangents are regenerated from
    per-direction integer seeds (:class:`Directions`); during the forward pass a layer's tangent
    exists only while that layer runs.

    ``tangent="rank1"`` draws every weight matrix's tangent as an outer product ``V = u r^T`` (``u``, ``r``
    of the chosen distribution; a convolution kernel is read as ``(out, in * kh * kw)``; biases keep a
    full tangent). ``E[V_ij V_kl] = E[u_i u_k] E[r_j r_l] = delta_ik delta_jl``, so ``E[v v^T] = I`` still
    holds and the estimate stays unbiased (Theorem 1 needs no more); with Rademacher factors every entry
    is +-1 as before, but entries of one matrix are correlated, which changes the variance (measure it
    with :func:`forwardlearn.diagnostics.gradient_alignment`). The gain is cost: ``h V^T = (h r) u^T`` is a
    rank-one update instead of a matrix product, and only ``O(rows + columns)`` random numbers per
    layer are drawn, so a step costs about two forward passes plus writing the gradient.

    Seed-and-scalar API (for distributed training and replay logs):

    - ``estimate(model, inputs, targets) -> (seeds, scalars, loss)``: ``K`` seeds drawn from the rule's
      stream, ``scalars[k] = d_k`` (float64, shape ``(K,)``); touches no ``.grad``, weights unchanged.
    - ``apply(model, seeds, scalars)``: ``p.grad += mean_k scalars[k] * v_k``, each ``v_k`` regenerated
      bit-identically from ``seeds[k]``.
    - ``grads = estimate + apply`` (with ``reuse_tangents``, full tangents, ``K = 1`` and no ``.grad`` yet:
      the same numbers from one pass that keeps each layer's tangent as its gradient buffer -- one sweep
      of random numbers instead of two, but the tangents and the activations then coexist at the peak).

    Small models (``K`` x the number of weights up to :data:`BATCHED_LIMIT`) run the ``K`` tangents in
    one ``vmap``-ed pass; larger ones one lazy pass per tangent.

    Args:
        directions: tangents per step ``K`` (default 32, tuned for ``digits``; the paper uses 1).
        distribution: ``rademacher`` (default; +-1, cheapest to draw) or ``gaussian`` (the paper's).
        tangent: ``full`` (default: i.i.d. entries, the paper's) or ``rank1`` (outer products, see above).
        reuse_tangents: trade a little peak memory for speed as described above (default off: lowest
            memory, the tangents live one layer at a time).
    """

    name: ClassVar[str] = "forward_gradient"
    description: ClassVar[str] = "forward gradient: (grad . v) v from forward-mode AD along random weight tangents"
    paper: ClassVar[str] = "Baydin, Pearlmutter, Syme, Wood & Torr 2022, Gradients without Backpropagation"
    #: digits: the estimator's variance grows with the number of weights, hence a narrow net and K = 32
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-2, "epochs": 20, "batch_size": 64, "hidden": [16], "model": "mlp",
    }
    forward_only: ClassVar[bool] = True

    def __init__(self, directions: int = 32, distribution: str = "rademacher", tangent: str = "full",
                 reuse_tangents: bool = False, loss: LossFn | None = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.directions = _check_int(directions, "directions")
        if not isinstance(reuse_tangents, bool):
            raise ValueError(f"reuse_tangents must be a bool, got {reuse_tangents!r}")
        if tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {', '.join(TANGENTS)}, got {tangent!r}")
        self.reuse_tangents = reuse_tangents
        self.tangent = tangent
        self.distribution = distribution
        self._dirs = Directions(distribution)

    # --- tangents ------------------------------------------------------------------------------------
    def _layout(self, params: list[nn.Parameter]) -> tuple[list[int], list[list[int]]]:
        """The lengths of the random vectors a direction is made of, and which of them each parameter uses:
        one per parameter (``full``), or two factors per weight matrix (``rank1``)."""
        if self.tangent == "full":
            return [p.numel() for p in params], [[i] for i in range(len(params))]
        numels: list[int] = []
        slots: list[list[int]] = []
        for p in params:
            sizes = [p.shape[0], p.numel() // p.shape[0]] if p.dim() >= 2 else [p.numel()]
            slots.append(list(range(len(numels), len(numels) + len(sizes))))
            numels.extend(sizes)
        return numels, slots

    def _tangent(self, seed: int, layout: tuple[list[int], list[list[int]]], i: int, p: Tensor) -> Tangent:
        """Parameter ``i``'s tangent of direction ``seed`` (a :class:`RankOne` for ``rank1`` weights)."""
        numels, slots = layout
        if len(slots[i]) == 1:
            return self._dirs.param(seed, numels, slots[i][0], p.detach())
        j, k = slots[i]
        u = self._dirs.param(seed, numels, j, torch.empty(numels[j], dtype=p.dtype, device=p.device))
        r = self._dirs.param(seed, numels, k, torch.empty(numels[k], dtype=p.dtype, device=p.device))
        return RankOne(u, r)

    def estimate(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[list[int], Tensor, float]:
        """``(seeds, scalars, loss)``: directional derivatives along ``K`` seeded tangents (see class doc)."""
        seeds = draw_seeds(self.generator("cpu"), self.directions)
        scalars = torch.empty(len(seeds), dtype=torch.float64)
        loss = float("nan")
        params = trainable_parameters(model)
        layout = self._layout(params)
        done = False
        if len(seeds) > 1 and len(seeds) * sum(p.numel() for p in params) <= BATCHED_LIMIT:
            try:  # small model: all K tangents in one vmapped forward-mode pass
                loss, d = self._batched(model, inputs, targets, params, layout, seeds)
                scalars.copy_(d)
                done = True
            except (RuntimeError, NotImplementedError):  # redo one at a time, which names the failing layer
                done = False
        if not done:
            for k, s in enumerate(seeds):
                loss, d = jvp_loss(model, inputs, targets, self.loss,
                                   lambda i, p, s=s: self._tangent(s, layout, i, p))
                scalars[k] = d
        check_finite(loss, "loss")
        check_finite(scalars.sum(), "directional derivative")
        return seeds, scalars, loss

    def _batched(self, model: nn.Module, inputs: Tensor, targets: Tensor, params: list[nn.Parameter],
                 layout: tuple[list[int], list[list[int]]], seeds: list[int]) -> tuple[float, Tensor]:
        """The same directional derivatives as the one-at-a-time pass, ``vmap``-ed over the ``K`` tangents."""
        names = {id(p): n for n, p in model.named_parameters()}
        keys = [names[id(p)] for p in params]
        primals = tuple(p.detach() for p in params)
        tangents = tuple(torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=p.device) for p in params)
        for k, s in enumerate(seeds):
            if self.tangent == "full":
                for i, a, b, z in self._dirs.pieces(s, layout[0], params[0].device):
                    tangents[i][k].view(-1)[a:b].copy_(z)
            else:
                for i, p in enumerate(params):
                    t = self._tangent(s, layout, i, p)
                    tangents[i][k].copy_(t.full(p) if isinstance(t, RankOne) else t)

        def loss_of(*ps: Tensor) -> Tensor:
            out = torch.func.functional_call(model, dict(zip(keys, ps)), (inputs,))
            return self.loss(out, targets)

        def one(*ts: Tensor) -> tuple[Tensor, Tensor]:
            return torch.func.jvp(loss_of, primals, ts)

        values, d = torch.func.vmap(one)(*tangents)
        return float(values[0].detach()), d.detach().to(torch.float64).cpu()

    def apply(self, model: nn.Module, seeds: list[int], scalars: Tensor) -> None:
        """Accumulate ``mean_k scalars[k] * v_k`` into ``.grad`` (``v_k`` regenerated from ``seeds[k]``)."""
        params = trainable_parameters(model)
        scalars = torch.as_tensor(scalars)
        if self.tangent == "full":
            accumulate_directions(params, self._dirs, list(seeds), scalars)
            return
        if len(seeds) != len(scalars):
            raise ValueError(f"got {len(seeds)} seeds but {len(scalars)} scalars")
        coefs = [float(c) / len(seeds) for c in scalars.detach().cpu().tolist()]
        layout = self._layout(params)
        for i, p in enumerate(params):
            for seed, c in zip(seeds, coefs):
                t = self._tangent(seed, layout, i, p)
                if p.grad is None:  # the first term writes the buffer: no zero fill, no extra pass
                    p.grad = (torch.outer(t.u, t.r).mul_(c).view_as(p) if isinstance(t, RankOne)
                              else t.mul_(c))
                elif isinstance(t, RankOne):
                    flat_view(p.grad, f"the gradient of parameter {i}").view(t.u.numel(), -1).addr_(t.u, t.r, alpha=c)
                else:
                    p.grad.add_(t, alpha=c)

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        params = trainable_parameters(model)
        if (self.reuse_tangents and self.tangent == "full" and self.directions == 1 and params
                and all(p.grad is None for p in params)):
            loss = self._grads_one(model, inputs, targets, params)
        else:
            seeds, scalars, loss = self.estimate(model, inputs, targets)
            self.apply(model, seeds, scalars)
        self.steps += 1
        return loss

    def _grads_one(self, model: nn.Module, inputs: Tensor, targets: Tensor, params: list[nn.Parameter]) -> float:
        """``K = 1`` and no ``.grad`` yet: each layer's tangent, made when the layer runs, is kept and
        becomes its ``.grad`` once scaled by ``d`` -- the same numbers as ``estimate`` + ``apply`` with
        one sweep of random numbers and no extra buffer (peak: weights + gradients + activations)."""
        (seed,) = draw_seeds(self.generator("cpu"), 1)
        numels = [p.numel() for p in params]
        kept: dict[int, Tensor] = {}

        def tangent_of(i: int, p: nn.Parameter) -> Tensor:
            if i not in kept:
                kept[i] = self._dirs.param(seed, numels, i, p.detach())
            return kept[i]

        loss, d = jvp_loss(model, inputs, targets, self.loss, tangent_of)
        check_finite(loss, "loss")
        check_finite(d, "directional derivative")
        for i, p in enumerate(params):
            v = kept.pop(i) if i in kept else self._dirs.param(seed, numels, i, p.detach())
            p.grad = v.mul_(d)
        return loss


@register
class ActivityForwardGradient(Rule):
    """Forward gradient with activity perturbation (Ren, Kornblith, Liao & Hinton 2022, Sec. 3, "activity
    perturbation"; the "activity" guess of Fournier et al. 2023).

    Every ``Linear``/``Conv2d`` output ``z_l`` gets a tangent ``u_l ~ N(0, I)`` per example, added to the
    tangent flowing in from earlier layers; one forward-mode pass then gives, for each example ``n``,
    ``d_n = sum_l dL/dz_l[n] . u_l[n]`` (per-example directional derivatives of the batch loss, see
    :func:`per_example_directional`). ``d_n u_l[n]`` is an unbiased estimate of ``dL/dz_l[n]``, and the
    weight estimate is the layer's local formula ``sum_n (d_n u_l[n]) x_l[n]^T`` with the layer's own
    input ``x_l`` (:func:`layer_weight_grads`). The noise has the dimension of the activations, not of
    the weights: far lower variance than weight perturbation. Assumes examples do not interact inside
    the model (no batch norm in training mode). ``directions=K`` averages ``K`` independent passes
    (default 4, tuned for ``digits``; the paper uses 1).
    """

    name: ClassVar[str] = "activity_forward_gradient"
    description: ClassVar[str] = "forward gradient with tangents on layer outputs, weights updated from local inputs"
    paper: ClassVar[str] = "Ren, Kornblith, Liao & Hinton 2022, Scaling Forward Gradient With Local Losses"
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 3e-3, "epochs": 20, "batch_size": 64, "hidden": [64], "model": "mlp",
    }
    forward_only: ClassVar[bool] = True

    def __init__(self, directions: int = 4, loss: LossFn | None = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        self.directions = _check_int(directions, "directions")

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        layers = perturbable_layers(model, self.name)
        gen = self.generator(inputs.device)
        loss = float("nan")
        for _ in range(self.directions):
            saved: list[tuple[nn.Module, Tensor, Tensor]] = []

            def hook(m: nn.Module, args: Any, out: Tensor, saved: list = saved) -> Tensor:
                primal, tan = fwAD.unpack_dual(out)
                u = torch.randn(primal.shape, generator=gen, dtype=primal.dtype, device=primal.device)
                saved.append((m, fwAD.unpack_dual(args[0]).primal.detach(), u))
                return fwAD.make_dual(primal, u if tan is None else tan + u)

            handles = [m.register_forward_hook(hook) for _, m in layers]
            try:
                with torch.no_grad(), fwAD.dual_level():
                    out = model(inputs)
                    primal, tan = fwAD.unpack_dual(out)
            finally:
                for h in handles:
                    h.remove()
            if tan is None:
                raise RuntimeError(f"{self.name}: the model output does not depend on any perturbed layer")
            with torch.no_grad():
                loss = check_finite(self.loss(primal, targets), "loss")
                d = per_example_directional(self.loss, primal.detach(), targets, tan.detach())
                while saved:  # one layer at a time, its inputs and tangents freed as we go
                    m, x, u = saved.pop()
                    g = u.mul_(d.view(-1, *([1] * (u.dim() - 1))) / self.directions)
                    _accumulate_layer(m, layer_weight_grads(m, x, g))
                    del m, x, u, g
        self.steps += 1
        return loss


class ChannelPool(nn.Module):
    """Global average pool per channel of a conv block's output, also after the block flattened it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, h: Tensor) -> Tensor:
        # Flatten keeps channel-major order, so (N, C*H*W) -> (N, C, H*W) undoes it
        return h.reshape(h.shape[0], self.channels, -1).mean(-1)


class LocalHeads(nn.Module):
    """``net`` plus one auxiliary classifier per hidden block; ``forward`` is ``net``'s."""

    def __init__(self, net: nn.Sequential, heads: nn.ModuleList) -> None:
        super().__init__()
        self.net = net
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def split_blocks(net: nn.Sequential) -> list[list[nn.Module]]:
    """Blocks of a ``Sequential``: each starts at a layer with parameters and takes the parameter-free
    layers (activation, pooling) after it; leading parameter-free layers join the first block."""
    blocks: list[list[nn.Module]] = [[]]
    seen_param = False
    for m in net:
        has = any(p.requires_grad for p in m.parameters())
        if has and seen_param:
            blocks.append([])
        seen_param = seen_param or has
        blocks[-1].append(m)
    return blocks


@register
class LocalForwardGradient(Rule):
    """Forward gradient with local-loss guesses (Fournier, Rivaud, Belilovsky, Eickenberg & Oyallon 2023,
    Sec. 3-4: the "local" guess with the end-to-end target).

    The model (an ``nn.Sequential``) is cut into blocks, one per layer with parameters plus the
    parameter-free layers after it. ``attach`` wraps it as :class:`LocalHeads` with one auxiliary
    linear classifier per hidden block (global-average-pooled first for conv blocks).

    Local computations (reverse mode confined to one block): block ``j`` gets its input *detached*,
    its auxiliary loss ``a_j = loss(head_j(block_j(x_j)), y)`` is backpropagated through that block and
    its head only, giving the guess ``G_j = d a_j / d theta_j`` and the head's own gradient (the head
    is trained on its local loss). The last block's local loss is the global loss itself.

    Global computation (forward mode only): the end-to-end gradient is projected on the guess by
    forward-mode AD, ``g = (grad L . G / |G|^2) G``: with ``projection="global"`` one JVP along the
    concatenated guess, with ``projection="block"`` one JVP per block, ``g_j = (grad_j L . G_j /
    |G_j|^2) G_j``. Not forward-only (``forward_only = False``): the guesses use backprop inside blocks.
    """

    name: ClassVar[str] = "local_forward_gradient"
    description: ClassVar[str] = "forward gradient along the gradient of a per-block auxiliary loss"
    paper: ClassVar[str] = ("Fournier, Rivaud, Belilovsky, Eickenberg & Oyallon 2023, "
                            "Can Forward Gradient Match Backpropagation?")
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 2e-3, "epochs": 8, "batch_size": 64, "hidden": [128], "model": "mlp",
    }
    forward_only: ClassVar[bool] = False

    def __init__(self, projection: str = "global", loss: LossFn | None = None, seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        if projection not in ("global", "block"):
            raise ValueError(f"projection must be 'global' or 'block', got {projection!r}")
        self.projection = projection

    def attach(self, model: nn.Module) -> nn.Module:
        if isinstance(model, LocalHeads):
            return model
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"{self.name} needs an nn.Sequential model to cut into blocks, got {type(model).__name__}")
        blocks = split_blocks(model)
        last = [m for m in model if isinstance(m, nn.Linear)]
        if not last:
            raise ValueError(f"{self.name}: the model has no final Linear layer to read the number of classes")
        classes = last[-1].out_features
        heads = nn.ModuleList()
        for block in blocks[:-1]:
            layer = [m for m in block if any(True for _ in m.parameters())][0]
            if isinstance(layer, nn.Linear):
                heads.append(nn.Linear(layer.out_features, classes))
            elif isinstance(layer, nn.Conv2d):
                heads.append(nn.Sequential(ChannelPool(layer.out_channels), nn.Linear(layer.out_channels, classes)))
            else:
                raise ValueError(f"{self.name}: no auxiliary head for a block starting with {type(layer).__name__}")
        p = next(model.parameters())
        heads.to(device=p.device, dtype=p.dtype)
        return LocalHeads(model, heads)

    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        if not isinstance(model, LocalHeads):
            raise ValueError(f"{self.name}: call rule.attach(model) first (it adds the auxiliary heads the "
                             "optimizer must see)")
        blocks = split_blocks(model.net)
        net_params = trainable_parameters(model.net)
        index = {id(p): i for i, p in enumerate(net_params)}
        guess: dict[int, Tensor] = {}
        block_of: list[list[int]] = []
        h = inputs
        loss = float("nan")
        for j, block in enumerate(blocks):
            bparams = [p for m in block for p in m.parameters() if p.requires_grad]
            with torch.enable_grad():
                out = h.detach()
                for m in block:
                    out = m(out)
                if j < len(blocks) - 1:
                    head = model.heads[j]
                    hparams = trainable_parameters(head)
                    local = self.loss(head(out), targets)
                    gs = torch.autograd.grad(local, bparams + hparams, allow_unused=True)
                    for p, g in zip(hparams, gs[len(bparams):]):
                        if g is not None:
                            accumulate_grad(p, g)
                else:
                    local = self.loss(out, targets)
                    loss = check_finite(local.detach(), "loss")
                    gs = torch.autograd.grad(local, bparams, allow_unused=True)
            for p, g in zip(bparams, gs[: len(bparams)]):
                guess[index[id(p)]] = torch.zeros_like(p) if g is None else g.detach()
            block_of.append([index[id(p)] for p in bparams])
            h = out.detach()
        if self.projection == "global":
            _, d = jvp_loss(model.net, inputs, targets, self.loss, lambda i, p: guess[i])
            norm2 = sum(float(g.double().pow(2).sum()) for g in guess.values())
            groups = [(list(guess), d, norm2)]
        else:
            groups = []
            for ids in block_of:
                chosen = set(ids)
                _, d = jvp_loss(model.net, inputs, targets, self.loss,
                                lambda i, p, chosen=chosen: guess[i] if i in chosen else None)
                groups.append((ids, d, sum(float(guess[i].double().pow(2).sum()) for i in ids)))
        for ids, d, norm2 in groups:
            scale = d / norm2 if norm2 > 0 else 0.0
            for i in ids:
                give_grad(net_params[i], guess.pop(i).mul_(scale))
        self.steps += 1
        return loss
