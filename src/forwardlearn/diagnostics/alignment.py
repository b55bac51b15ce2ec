"""Weight alignment: how close a feedback pathway has come to the transposed forward weights.

The measure of BioTorch's benchmark (Sanfiz & Akrout 2021, "Benchmarking the Accuracy and Robustness of
Feedback Alignment Algorithms", arXiv:2108.13446): per layer, the angle between the flattened feedback matrix
``B`` and the forward weights ``W`` (0 degrees: backprop's symmetric feedback; 90: unrelated), and the
norm ratio ``|B| / |W|``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..rules.direct_feedback_alignment import dfa_blocks, dfa_feedback
from ..rules.feedback_alignment import effective_feedback, feedback_layers


def _angle(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    cos = float(torch.dot(a, b) / (na * nb))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _ratio(a: Tensor, b: Tensor) -> float:
    nb = float(b.double().norm())
    return float(a.double().norm()) / nb if nb > 0 else float("nan")


@torch.no_grad()
def weight_alignment(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per feedback layer of ``model``: ``{"angle": degrees, "norm_ratio": |B|/|W|, "feedback": kind}``.

    - ``fa`` / ``sign_symmetry`` / ``pfa`` layers (keyed by the layer's name): ``B`` is the matrix used
      in place of ``W`` (for PFA the product ``B R``), compared with the layer's own ``W``.
    - ``dfa`` (keyed by the name of each hidden block's weighted layer): ``B_l`` sends the output error
      to that block's output; its backprop counterpart in a linearised network is the product of the
      downstream weights ``W_L ... W_{l+1}``, which is what ``B_l`` is compared with when every
      downstream weighted layer is ``nn.Linear`` (otherwise the angle and ratio are NaN).

    Raises ``ValueError`` when the model has no feedback (no feedback rule attached, or ``dfa`` before
    its first step).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, layer in feedback_layers(model):
        b = effective_feedback(layer)
        w = layer.weight.detach()
        out[name] = {"angle": _angle(b, w), "norm_ratio": _ratio(b, w), "feedback": layer.fb_mode}
    fbs = dfa_feedback(model) if isinstance(model, nn.Sequential) else {}
    if fbs:
        names = {id(m): n for n, m in model.named_modules()}
        weighted = [next(m for m in block if isinstance(m, (nn.Linear, nn.Conv2d))) for block in dfa_blocks(model)]
        for i, b in sorted(fbs.items()):
            down = weighted[i + 1 :]
            angle = ratio = float("nan")
            if down and all(isinstance(m, nn.Linear) for m in down):
                prod = down[-1].weight.detach()
                for m in reversed(down[:-1]):
                    prod = prod @ m.weight.detach()
                if prod.shape == b.shape:
                    angle, ratio = _angle(b, prod), _ratio(b, prod)
            out[names.get(id(weighted[i]), str(i))] = {"angle": angle, "norm_ratio": ratio, "feedback": "dfa"}
    if not out:
        raise ValueError("the model has no feedback matrices: attach fa, sign_symmetry or pfa first "
                         "(dfa creates its matrices at its first step)")
    return out
