"""Per-layer local gradients: the weight gradient of one ``Linear``/``Conv2d`` layer from its own input and
an output signal, by the layer's own formula (no autograd). Activity-perturbed and likelihood-ratio rules
build their weight updates from these.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..rules.base import accumulate_grad

PERTURBABLE = (nn.Linear, nn.Conv2d)

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


def accumulate_layer(module: nn.Module, grads: dict[str, Tensor]) -> None:
    """``p.grad += g`` for every named local gradient of ``module`` (see :func:`give_grad`)."""
    for k, g in grads.items():
        p = module._parameters[k]
        if p is not None and p.requires_grad:
            give_grad(p, g)

