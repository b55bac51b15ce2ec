"""Direct feedback alignment (Nøkland 2016): the output error sent straight to every block.

DFA uses no backward chain across blocks: each chosen block (by default every residual block, transformer
layer, else every weighted layer; :mod:`forwardlearn.blocks`) runs on a detached input, and the tensor it
hands on receives ``e B_l`` where ``e`` is the output error. The feedback matrices live on the model and
are saved in the rule's ``state_dict`` (bookkeeping shared with
:mod:`forwardlearn.rules.feedback_alignment`, where the error travels back through the layers).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec, cut_forward, select_blocks
from .base import check_finite, register
from .feedback_alignment import _check_scale, _TrackedFeedback

__all__ = ["DFA", "dfa_blocks", "dfa_feedback"]


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
