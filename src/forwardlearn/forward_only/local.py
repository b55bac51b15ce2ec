"""Local gradients: the parameter gradient of one layer or block from its own input and an output signal.

Activity-perturbed and likelihood-ratio rules estimate ``dL/d(output)`` of every perturbed unit and turn it
into parameter gradients here:

- ``Linear``, ``Conv2d`` and the normalisation layers (``BatchNorm1d/2d``, ``LayerNorm``) by the layer's
  own formula (no autograd, forward-only);
- any other unit (a residual block, a transformer layer, an attention module) by its vector-Jacobian
  product with the estimated output gradient: the unit is re-run on its saved input with autograd on, so
  reverse mode stays inside that unit (local), never across units.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockSpec, first_tensor, select_blocks
from ..rules.base import LossFn, accumulate_grad
from .forward_mode import per_example_directional

PERTURBABLE = (nn.Linear, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
#: units whose parameter gradient has a closed form here (forward-only)
FORMULA = (*PERTURBABLE, *NORMS)
#: :func:`output_gradient` of a loss other than cross-entropy uses the exact batch-loss path up to this many numbers
GRADIENT_LIMIT = 2**22


def has_formula(m: nn.Module) -> bool:
    """A layer of :data:`FORMULA`, or a module with its own ``local_weight_grads(x, g) -> {name: grad}``."""
    return isinstance(m, FORMULA) or callable(getattr(m, "local_weight_grads", None))


def _own(m: nn.Module) -> list[str]:
    return [k for k, p in m._parameters.items() if p is not None and p.requires_grad]


def perturbable_layers(model: nn.Module, rule: str) -> list[tuple[str, nn.Module]]:
    """The ``Linear``/``Conv2d`` layers of ``model``; any other layer with trained parameters is an error."""
    out = []
    for name, m in model.named_modules():
        own = _own(m)
        if not own:
            continue
        if not isinstance(m, PERTURBABLE):
            raise ValueError(
                f"{rule} perturbs the outputs of Linear and Conv2d layers only; layer {name!r} "
                f"({type(m).__name__}) has trained parameters {own}"
            )
        _check_conv(m, name, rule)
        out.append((name, m))
    if not out:
        raise ValueError(f"{rule}: the model has no Linear or Conv2d layer with trained parameters")
    return out


def _check_conv(m: nn.Module, name: str, rule: str) -> None:
    if isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
        raise ValueError(f"{rule}: layer {name!r} uses padding={m.padding!r}/{m.padding_mode!r}; "
                         "only numeric zero padding is supported")


def perturbed_units(model: nn.Module, rule: str, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """The units whose outputs a perturbation rule perturbs, in ``named_modules`` order.

    The blocks chosen by ``blocks`` (:func:`forwardlearn.blocks.select_blocks`; default: residual blocks,
    transformer layers, else ``Linear``/``Conv2d``) that hold trained parameters, plus every other module
    that owns trained parameters outside them (a normalisation layer, an attention module, an embedding).
    On an MLP or a plain CNN these are exactly its ``Linear``/``Conv2d`` layers. With the automatic choice, a
    layer and the normalisation after it in one ``nn.Sequential`` are one unit (:func:`_normalised`; the
    residual CNN's stem). Parameters that belong to the forward of ``model`` itself (outside every submodule)
    are an error.
    """
    chosen = select_blocks(model, blocks, rule)
    inside = {id(c) for _, b in chosen for c in b.modules()}
    ids = {id(m) for _, m in chosen}
    root = _own(model)
    if root and id(model) not in ids:
        raise ValueError(f"{rule}: parameters {root} are used by {type(model).__name__}.forward itself, outside any "
                         "layer or block, so no perturbed output covers them; move them into a submodule")
    out = []
    for name, m in model.named_modules():
        if id(m) in ids:
            if any(p.requires_grad for p in m.parameters()):
                out.append((name, m))
        elif id(m) not in inside and _own(m):
            out.append((name, m))
    if blocks is None or blocks == "auto":
        out = _normalised(model, out)
    for name, m in out:
        _check_conv(m, name, rule)
    if not out:
        raise ValueError(f"{rule}: the model has no layer or block with trained parameters")
    return out


def _normalised(model: nn.Module, units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``units`` with every ``nn.Sequential`` (not the model itself) whose weighted children are exactly one
    ``Linear``/``Conv2d`` unit followed by normalisation units (``Conv2d -> BatchNorm2d -> ReLU``) as one unit
    (automatic choice only: blocks given by name or type are kept as given).

    The layer's output before its normalisation has its own small scale and a gradient the normalisation
    amplifies: a unit-variance perturbation there dominates every other unit's estimate (on ``rescnn`` its
    per-example squared gradient norm is over 25 times the block output's). Perturbed after the normalisation and
    trained through it locally instead, as Ren et al. 2023 add their noise after the normalisation and take
    its gradient through the normalisation layer (their released code).
    """
    ids = {id(m) for _, m in units}
    groups: dict[int, tuple[str, nn.Module]] = {}
    for name, seq in model.named_modules():
        if seq is model or not isinstance(seq, nn.Sequential):
            continue
        weighted = [c for c in seq.children() if any(p.requires_grad for p in c.parameters())]
        if (len(weighted) > 1 and all(id(c) in ids for c in weighted) and isinstance(weighted[0], PERTURBABLE)
                and all(isinstance(c, NORMS) for c in weighted[1:])):
            groups.update({id(c): (name, seq) for c in weighted})
    out: list[tuple[str, nn.Module]] = []
    for name, m in units:
        unit = groups.get(id(m), (name, m))
        if not out or out[-1][1] is not unit[1]:
            out.append(unit)
    return out


def output_unit(outputs: Tensor, produced: list[tuple[int, torch.Size]]) -> int | None:
    """The index in ``produced`` (``(data_ptr, shape)`` of every unit's output, in the order the units ran) of the
    unit whose output is the model's output ``outputs`` itself, or ``None`` when the model changes it further."""
    key = (outputs.data_ptr(), outputs.shape)
    hits = [i for i, k in enumerate(produced) if k == key]
    return hits[-1] if hits else None


def output_gradient(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``dL/d outputs`` of the batch loss ``L = loss_fn(outputs, targets)`` without a reverse pass: the derivative
    with respect to the model's output only. Cross-entropy: ``(softmax - onehot) / N``. Any other loss: one
    forward-mode pass per output feature, through
    :func:`~forwardlearn.forward_only.forward_mode.per_example_directional` (exact for any loss of the batch)
    while its ``N x N`` masks fit in :data:`GRADIENT_LIMIT` numbers, else through the per-example losses (the
    loss taken to be their mean, as ``ulr`` requires)."""
    n = outputs.shape[0]
    if loss_fn is F.cross_entropy and outputs.dim() == 2 and targets.dtype == torch.long and targets.dim() == 1:
        g = torch.softmax(outputs, 1)
        g[torch.arange(n, device=g.device), targets] -= 1.0
        return g / n
    flat = outputs.reshape(n, -1)

    def per_example(o: Tensor) -> Tensor:
        return torch.func.vmap(lambda a, t: loss_fn(a.unsqueeze(0), t.unsqueeze(0)))(o, targets) / n

    cols = []
    for j in range(flat.shape[1]):
        t = torch.zeros_like(flat)
        t[:, j] = 1.0
        if n * n * flat.shape[1] <= GRADIENT_LIMIT:
            cols.append(per_example_directional(loss_fn, outputs, targets, t.view_as(outputs)))
        else:
            cols.append(torch.func.jvp(per_example, (outputs,), (t.view_as(outputs),))[1])
    return torch.stack(cols, 1).view_as(outputs)


class Saved(NamedTuple):
    """What a unit's forward hook keeps for its local gradient: the unit, its (primal, detached) inputs,
    and for re-run units the random-number state before it ran and its buffers after."""

    module: nn.Module
    args: tuple
    kwargs: dict
    rng: Tensor | None


def primal(value: Any) -> Any:
    """``value`` with every tensor replaced by its detached primal (forward-mode tangents dropped)."""
    if isinstance(value, Tensor):
        return fwAD.unpack_dual(value).primal.detach()
    if isinstance(value, tuple):
        return tuple(primal(v) for v in value)
    if isinstance(value, list):
        return [primal(v) for v in value]
    if isinstance(value, dict):
        return {k: primal(v) for k, v in value.items()}
    return value


def save_inputs(m: nn.Module, args: tuple, kwargs: dict, rng: Tensor | None) -> Saved:
    """A :class:`Saved` record; formula layers keep only their input tensor."""
    if has_formula(m):
        return Saved(m, (primal(args[0]),), {}, None)
    return Saved(m, primal(args), primal(kwargs), rng)


def _norm_hat(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The normalised input ``x_hat`` of a normalisation layer and the dims its affine parameters sum over."""
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        dims = tuple(range(x.dim() - k, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps), tuple(range(x.dim() - k))
    dims = (0, *range(2, x.dim()))
    shape = (1, -1, *([1] * (x.dim() - 2)))
    if module.training or module.running_mean is None:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps), dims


def layer_weight_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Gradient of ``sum(g * module(x))`` w.r.t. the layer's weight and bias, by the layer's own formula.

    ``Linear``: ``g^T x`` and ``sum_n g``; ``Conv2d``: the weight-gradient convolution of ``x`` with
    ``g`` (``torch.nn.grad.conv2d_weight``, a single kernel call, no autograd) and ``sum g`` over batch
    and space; ``BatchNorm``/``LayerNorm`` (``y = x_hat w + b``): ``sum g x_hat`` and ``sum g`` over every
    dimension but the normalised features' (batch statistics in training mode, as in the forward pass).
    This is the local part of a layer's update: input and output signal of one layer only.
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
    elif isinstance(module, NORMS):
        x_hat, dims = _norm_hat(module, x)
        if module.weight is not None:
            out["weight"] = (g * x_hat).sum(dims)
        if module.bias is not None:
            out["bias"] = g.sum(dims)
    else:
        raise ValueError(f"no local weight gradient formula for {type(module).__name__}")
    return out


def local_grads(saved: Saved, g: Tensor) -> dict[str, Tensor]:
    """Gradient of ``sum(g * unit(inputs))`` w.r.t. the unit's trained parameters (keys: names inside it).

    :data:`FORMULA` layers use :func:`layer_weight_grads`, modules with ``local_weight_grads`` their own; any
    other unit is re-run on its saved inputs with
    autograd on and differentiated by reverse mode *inside the unit only*; its buffers (batch-norm running
    statistics) are put back afterwards and its random-number state is the one it ran with.
    """
    m = saved.module
    if isinstance(m, FORMULA):
        return layer_weight_grads(m, saved.args[0], g)
    if has_formula(m):
        return m.local_weight_grads(saved.args[0], g)
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    buffers = {k: b.clone() for k, b in m.named_buffers()}
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        if saved.rng is not None:
            torch.set_rng_state(saved.rng)
        out = first_tensor(m(*saved.args, **saved.kwargs))
        grads = torch.autograd.grad(out, [p for _, p in named], g.to(out.dtype), allow_unused=True)
    with torch.no_grad():
        for k, b in m.named_buffers():
            b.copy_(buffers[k])
    return {k: gr for (k, _), gr in zip(named, grads) if gr is not None}


def give_grad(p: nn.Parameter, g: Tensor) -> None:
    """``p.grad += g`` like :func:`accumulate_grad`, but a fresh ``g`` this rule owns becomes ``p.grad``
    without a copy when there is none yet (saves one parameter-sized buffer at the peak)."""
    if p.grad is None and g.dtype == p.dtype and g.device == p.device and g.shape == p.shape and g.is_contiguous():
        p.grad = g.detach()
    else:
        accumulate_grad(p, g)


def accumulate_layer(module: nn.Module, grads: dict[str, Tensor]) -> None:
    """``p.grad += g`` for every named local gradient of ``module`` (see :func:`give_grad`)."""
    for k, g in grads.items():
        p = module._parameters[k] if "." not in k else module.get_parameter(k)
        if p is not None and p.requires_grad:
            give_grad(p, g)


__all__ = ["FORMULA", "NORMS", "PERTURBABLE", "Saved", "accumulate_layer", "give_grad",
           "has_formula", "layer_weight_grads", "local_grads", "output_gradient", "output_unit", "perturbable_layers",
           "perturbed_units", "primal", "save_inputs"]
