"""Building blocks of Forward-Forward (Hinton 2022) and collaborative Forward-Forward (Lorberbom et al. 2024).

Goodness and the per-layer logistic loss (Hinton 2022, section 2, eq. 1), length normalisation
(section 2.1), label embedding and negative labels (section 3.3), the collaborative logits
(Lorberbom et al. 2024), the split of an MLP into layers (:func:`mlp_blocks`, also used by PEPITA) and
the widening of the first ``Linear`` for a label written in front of the input. The rules themselves are
in :mod:`forwardlearn.rules.forward_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "collaborative_logits",
    "embed_label",
    "ff_layer_loss",
    "goodness",
    "hard_negative_labels",
    "length_normalize",
    "mlp_blocks",
    "positive_logits",
    "random_negative_labels",
    "scale_to_mean_square",
]


# --- layer-wise helpers ---------------------------------------------------------------------------
def goodness(h: Tensor, minus: bool = False) -> Tensor:
    """Per-example goodness ``G = sum of squared activities`` over every non-batch dimension, shape ``(N,)``.

    ``minus=True`` returns ``-G`` (Hinton 2022, section 2: positive data should then have *low* activity).
    Works for dense ``(N, D)`` and convolutional ``(N, C, H, W)`` activities alike.
    """
    g = h.pow(2).flatten(1).sum(1)
    return -g if minus else g


def positive_logits(h: Tensor, threshold: float, minus: bool = False, temperature: float = 1.0) -> Tensor:
    """Logit of ``p(positive)`` for a layer's activities ``h`` (Hinton 2022, eq. 1): ``(G - theta) / T``.

    With ``minus=True`` the sign flips, ``(theta - G) / T``: low activity means positive.
    """
    z = goodness(h, minus) + (threshold if minus else -threshold)
    return z if temperature == 1.0 else z / temperature


def ff_layer_loss(logit_pos: Tensor, logit_neg: Tensor) -> Tensor:
    """Logistic loss of one layer: ``-log p(pos | positive data) - log(1 - p(pos | negative data))``.

    Both terms are means over their batch; ``softplus(-z) = -log sigmoid(z)`` keeps it stable.
    """
    return F.softplus(-logit_pos).mean() + F.softplus(logit_neg).mean()


def collaborative_logits(logits: Sequence[Tensor]) -> list[Tensor]:
    """Collaborative Forward-Forward logits (Lorberbom et al. 2024, the collaborative objective).

    Layer ``k`` is judged on the goodness of the whole network, ``sum_l (G_l - theta_l)``, with every
    other layer's term held constant (detached): its value is the collective one, its gradient only its own.
    """
    total = torch.stack([z.detach() for z in logits]).sum(0)
    return [z + (total - z.detach()) for z in logits]


def length_normalize(h: Tensor, eps: float = 1e-8) -> Tensor:
    """Divide each example's activity vector by its root-mean-square (Hinton 2022, section 2.1).

    The direction is kept and the length is set to ``sqrt(D)``, so the next layer sees no trace of this
    layer's goodness. (Root-mean-square rather than unit length keeps inputs O(1) per unit; the two
    differ only by the constant ``sqrt(D)``.)
    """
    return F.rms_norm(h, h.shape[1:], eps=eps)


def embed_label(x: Tensor, labels: Tensor | None, classes: int, mode: str, scale: float = 1.0) -> Tensor:
    """Write the one-hot label into a flattened input (Hinton 2022, section 3.3).

    ``mode="overwrite"`` replaces the first ``classes`` features (the image's first pixels, blank in
    MNIST); ``mode="concat"`` puts the one-hot code in front of the input. ``labels=None`` writes the
    neutral label, ``1/classes`` in every entry (the paper's 0.1 for ten classes). Returns ``(N, D)``.
    """
    flat = x.flatten(1)
    n = flat.shape[0]
    if labels is None:
        code = torch.full((n, classes), scale / classes, dtype=flat.dtype, device=flat.device)
    else:
        code = F.one_hot(labels.long(), classes).to(flat.dtype) * scale
    if mode == "concat":
        return torch.cat([code, flat], 1)
    if mode == "overwrite":
        if flat.shape[1] < classes:
            raise ValueError(f"cannot overwrite {classes} label entries of a {flat.shape[1]}-feature input")
        return torch.cat([code, flat[:, classes:]], 1)
    raise ValueError(f"label mode must be 'overwrite' or 'concat', got {mode!r}")


def random_negative_labels(labels: Tensor, classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A wrong label per example, uniform over the ``classes - 1`` wrong ones (never the true label)."""
    shift = torch.randint(1, classes, labels.shape, generator=generator, device=labels.device)
    return (labels + shift) % classes


def hard_negative_labels(scores: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A wrong label per example drawn in proportion to the model's own belief in it (Hinton 2022, 3.3).

    ``scores`` ``(N, C)`` are the model's class scores; the true label is masked out, the rest go through
    a softmax, and one label is sampled per row, so the true label is never returned.
    """
    masked = scores.detach().float().scatter(1, labels.long().view(-1, 1), float("-inf"))
    probs = torch.softmax(masked, 1)
    # a row whose scores are all -inf or NaN would give NaN probabilities: fall back to uniform there
    bad = ~torch.isfinite(probs).all(1, keepdim=True)
    if bool(bad.any()):
        uniform = torch.ones_like(probs).scatter(1, labels.long().view(-1, 1), 0.0)
        probs = torch.where(bad, uniform, probs)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def mlp_blocks(model: nn.Module, exclude: Sequence[str] = ()) -> tuple[list[nn.Sequential], nn.Linear]:
    """Split an MLP (``Flatten -> [Linear -> activation]* -> Linear``) into Forward-Forward layers.

    Returns ``(blocks, head)``: each block is ``Sequential(Linear, <the element-wise modules after it>)``
    sharing the model's own modules; ``head`` is the final ``Linear`` (its ``out_features`` is the number
    of classes; Forward-Forward does not train it). Children named in ``exclude`` (modules a rule added,
    such as a read-out) are skipped. Anything other than ``Flatten``, ``Linear``, ``Dropout`` and
    parameter-free element-wise layers raises ``ValueError``.
    """
    if isinstance(model, nn.Sequential):
        mods = [m for n, m in model.named_children() if n not in exclude]
    else:
        mods = [model]
    linears = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ValueError("Forward-Forward needs an MLP with at least one hidden Linear layer and a final Linear")
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Linear, nn.Flatten, nn.Dropout, nn.Identity)):
            continue
        if any(True for _ in m.parameters()) or len(list(m.children())) > 0:
            raise ValueError(f"Forward-Forward works on plain MLPs; cannot handle layer {i}: {type(m).__name__}")
    if any(isinstance(m, nn.Flatten) for m in mods[linears[0]:]):
        raise ValueError("Forward-Forward MLP: Flatten must come before the first Linear")
    blocks = []
    for a, b in zip(linears[:-1], linears[1:]):
        blocks.append(nn.Sequential(*mods[a:b]))
    return blocks, mods[linears[-1]]


def _neutral_in_front(classes: int, scale: float) -> Callable[[nn.Module, tuple[Any, ...]], Any]:
    """Forward pre-hook of a widened first ``Linear``: a ``D``-feature input gets the neutral label in front."""
    def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        x = args[0]
        if x.shape[-1] != module.in_features - classes:
            return None
        code = torch.full((*x.shape[:-1], classes), scale / classes, dtype=x.dtype, device=x.device)
        return (torch.cat([code, x], -1), *args[1:])
    return hook


def _widen_input(linear: nn.Linear, classes: int, scale: float, seed: int) -> None:
    """Give ``linear`` ``classes`` more input columns in front (for the label), in place, once."""
    if getattr(linear, "ff_label_columns", 0):
        return
    w = linear.weight
    bound = 1 / math.sqrt(linear.in_features + classes)  # nn.Linear's own init for the new fan-in
    g = torch.Generator().manual_seed(seed)
    front = (torch.rand(w.shape[0], classes, generator=g, dtype=torch.float64) * 2 - 1) * bound
    with torch.no_grad():
        w.data = torch.cat([front.to(device=w.device, dtype=w.dtype), w.detach()], 1)
    w.grad = None
    linear.in_features += classes
    linear.ff_label_columns = classes
    linear.register_forward_pre_hook(_neutral_in_front(classes, scale))


def _accept_widened_state(linear: nn.Linear, classes: int, scale: float) -> None:
    """Let ``linear`` load a state whose weight was widened by :func:`_widen_input` (resuming a checkpoint)."""
    if getattr(linear, "ff_accepts_widened", False):
        return

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        w = state.get(prefix + "weight")
        if w is not None and w.dim() == 2 and w.shape[1] == module.in_features + classes:
            _widen_input(module, classes, scale, 0)  # the values come from the state right after

    linear._register_load_state_dict_pre_hook(hook, with_module=True)
    linear.ff_accepts_widened = True


@torch.no_grad()
def scale_to_mean_square(block: nn.Module, x: Tensor, target: float, passes: int = 5) -> float:
    """Scale the first ``Linear`` of ``block`` (weight and bias, in place) until ``block(x)`` has mean square
    ``target`` (within 0.1 %, at most ``passes`` passes); return the factor applied. A ReLU block is positively
    homogeneous, so one pass is exact (the LSUV idea of Mishkin & Matas 2016 with a goodness target). A block
    without a ``Linear``, a target of 0 or an all-zero output is left as it is (factor 1)."""
    lin = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
    total = 1.0
    for _ in range(passes):
        ms = float(block(x).float().pow(2).mean())
        if lin is None or target <= 0 or not 0 < ms < float("inf") or abs(ms / target - 1) < 1e-3:
            break
        c = math.sqrt(target / ms)
        lin.weight.mul_(c)
        if lin.bias is not None:
            lin.bias.mul_(c)
        total *= c
    return total
