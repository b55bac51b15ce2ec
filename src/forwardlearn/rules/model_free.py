"""Model-free forward-forward training of networks with black-box physical layers.

Momeni, Rahmani, Mallejac, del Hougne & Fleury (2023), "Backpropagation-free training of deep
physical neural networks", Science 382, 1297; arXiv:2304.11042, "model-free forward-forward
training"): the network is a chain of blocks, each a fixed physical system ``P_i`` (known only by
measuring its output) followed by a trainable digital layer ``W_i``. Each block is trained with a
layer-local objective evaluated *after* its digital layer, so its gradient needs only the measured
physical output, never a derivative of ``P_i``. As in the authors' reference code
(MomeniAli/PhyLL):

- positive data: the input with its true label embedded; negative data: the same input with a
  wrong label (drawn at random);
- block ``i``: ``h_i = act(W_i P_i(n(h_{i-1})))`` (``n``: RMS normalisation of the previous block's
  output, Hinton's length normalisation; with the cosine goodness it changes nothing but scale);
- ``goodness="cosine"`` (default, the reference code's objective): ``G_i = cos(h_i, p_i)`` with a
  fixed random unit vector ``p_i`` per block, and the paired contrastive loss
  ``softplus(-sharpness * (G_i(pos) - G_i(neg)))``;
  ``goodness="energy"`` (Hinton's 2022 forward-forward): ``G_i = mean(h_i^2)`` and
  ``softplus(threshold - G_i(pos)) + softplus(G_i(neg) - threshold)``;
- each loss is minimised for ``W_i`` only (the input of every block is measured and detached);
- prediction: the label whose embedding gives the largest goodness summed over the blocks.

Labels are embedded additively: a fixed random +-``label_scale`` pattern per class is added to the
flattened input (the input keeps its size, so any model fits; for a linear first layer this is as
expressive as appending a one-hot label). Physical noise and drift act during training and
inference alike; the local objective keeps adapting the digital layers to the physical layer's
current behaviour, which is what lets training track a drifting system.

A block boundary is every leaf module that has trainable parameters (``nn.Linear``, ...); the
parameter-free modules before it (``Flatten``, :class:`~forwardlearn.physical.BlackBox` layers,
activations, ...) are its measured prefix, and an activation right after it belongs to it. A plain
MLP is trained the same way (forward-forward without physical layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossFn, Rule, accumulate_grad, check_finite, register

_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU)


def _leaves(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for m in model:
            out += _leaves(m)
        return out
    return [model]


def blocks_of(model: nn.Module) -> list[tuple[list[nn.Module], nn.Module, nn.Module | None]]:
    """Split a (nested) ``nn.Sequential`` into ``(measured prefix, trainable layer, activation)`` blocks."""
    blocks: list[tuple[list[nn.Module], nn.Module, nn.Module | None]] = []
    prefix: list[nn.Module] = []
    mods = _leaves(model)
    i = 0
    while i < len(mods):
        m = mods[i]
        if any(p.requires_grad for p in m.parameters()):
            act = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], _ACTIVATIONS) else None
            blocks.append((prefix, m, act))
            prefix = []
            i += 2 if act is not None else 1
            continue
        prefix.append(m)
        i += 1
    if not blocks:
        raise ValueError(f"model_free_ff needs an nn.Sequential with trainable layers, got {type(model).__name__} "
                         "with none")
    return blocks


@register
class ModelFreeForwardForward(Rule):
    """Model-free forward-forward training of the digital layers between black-box physical layers.

    Args:
        goodness: ``"cosine"`` (cosine to a fixed random vector, paired contrastive loss; the
            reference code's) or ``"energy"`` (mean square with a threshold; Hinton's).
        sharpness: scale of the goodness difference in the cosine loss (the reference code uses 4-5).
        threshold: goodness threshold ``theta`` of the energy loss.
        label_scale: amplitude of the per-class +-1 patterns added to the input (0.5: a +-pi/2 phase
            shift on a phase-encoding physical input; 1 would make +1 and -1 the same phase).
        classes: number of classes; ``None``: the largest label seen in training + 1 (the patterns of
            the first classes do not change when more appear).
        loss: unused (the objectives are local); accepted for the common interface.
        seed: seed of the label patterns and of the negative labels.
    """

    name: ClassVar[str] = "model_free_ff"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = ("forward-forward training of digital layers between black-box physical layers, "
                                  "no model of the physics")
    paper: ClassVar[str] = ("Momeni, Rahmani, Mallejac, del Hougne & Fleury 2023, Backpropagation-free training of "
                            "deep physical neural networks (Science 382:1297)")
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 3e-3,
        "epochs": 8,
        "batch_size": 64,
        "hidden": [256],
        "model": "mlp",
    }
    forward_only: ClassVar[bool] = False  # autograd inside each digital layer only, never across a block

    def __init__(self, goodness: str = "cosine", sharpness: float = 4.0, threshold: float = 1.0,
                 label_scale: float = 0.5, classes: int | None = None, loss: LossFn | None = None,
                 seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        if goodness not in ("cosine", "energy"):
            raise ValueError(f"goodness must be 'cosine' or 'energy', got {goodness!r}")
        for v, what in ((sharpness, "sharpness"), (threshold, "threshold"), (label_scale, "label_scale")):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{what} must be a positive finite number, got {v!r}")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
            raise ValueError(f"classes must be an integer >= 2 or None, got {classes!r}")
        self.goodness = goodness
        self.sharpness = float(sharpness)
        self.threshold = float(threshold)
        self.directions: list[Tensor] = []
        self.label_scale = float(label_scale)
        self.patterns: Tensor | None = None
        self.classes = classes or 0
        #: ``hook(k, loss_k) -> loss_k`` applied to block ``k``'s local loss before its gradient (locality tests)
        self.local_loss_hook: Callable[[int, Tensor], Tensor] | None = None

    @classmethod
    def model_spec(cls) -> dict[str, Any]:
        """A simulated optical front end (256 outputs, noise 0.01) followed by ``defaults["hidden"]`` digital layers.

        The built network records ``classes`` (attribute ``classes``, see the ``physical`` model), so that
        predictions have a column for every class even before a batch has shown the highest label."""
        return {"name": "physical", "hidden": list(cls.defaults["hidden"]), "physical_width": 256}

    # --- helpers ------------------------------------------------------------------------------
    def _patterns(self, features: int, classes: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self.patterns is None or self.patterns.shape != (classes, features):
            g = torch.Generator().manual_seed(self.seed + 1)  # fixed by the seed, independent of the step stream
            signs = torch.randint(0, 2, (classes, features), generator=g) * 2 - 1
            self.patterns = signs.to(torch.float32) * self.label_scale
        return self.patterns.to(device=device, dtype=dtype)

    def _direction(self, i: int, features: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The fixed random unit vector ``p_i`` of block ``i`` (cosine goodness)."""
        while len(self.directions) <= i:
            self.directions.append(torch.empty(0))
        if self.directions[i].numel() != features:
            g = torch.Generator().manual_seed(self.seed + 2 + i)
            p = torch.randn(features, generator=g)
            self.directions[i] = p / p.norm()
        return self.directions[i].to(device=device, dtype=dtype)

    def _goodness(self, i: int, h: Tensor) -> Tensor:
        flat = h.flatten(1)
        if self.goodness == "energy":
            return flat.pow(2).mean(1)
        p = self._direction(i, flat.shape[1], flat.device, flat.dtype)
        return (flat @ p) / (flat.norm(dim=1) + 1e-6)

    def _local_loss(self, good: Tensor, n: int) -> Tensor:
        pos, neg = good[:n], good[n:]
        if self.goodness == "energy":
            return F.softplus(self.threshold - pos).mean() + F.softplus(neg - self.threshold).mean()
        return F.softplus(-self.sharpness * (pos - neg)).mean()

    @staticmethod
    def _normalise(h: Tensor) -> Tensor:
        return h / (h.pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (h.dim() - 1))) + 1e-8)

    @staticmethod
    def _run(prefix: list[nn.Module], h: Tensor) -> Tensor:
        for m in prefix:
            h = m(h)
        return h

    # --- the rule -----------------------------------------------------------------------------
    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        blocks = blocks_of(model)
        x = inputs.flatten(1)
        n = x.shape[0]
        self.classes = classes = max(self.classes, int(getattr(model, "classes", 0)), int(targets.max()) + 1)
        E = self._patterns(x.shape[1], classes, x.device, x.dtype)
        g = self.generator(x.device)
        wrong = (targets + torch.randint(1, classes, (n,), generator=g, device=x.device)) % classes
        h = torch.cat([x + E[targets], x + E[wrong]]).view(2 * n, *inputs.shape[1:])
        total = 0.0
        for i, (prefix, layer, act) in enumerate(blocks):
            with torch.no_grad():
                z = self._run(prefix, h if i == 0 else self._normalise(h))
            params = [p for p in layer.parameters() if p.requires_grad]
            with torch.enable_grad():
                out = layer(z)
                if act is not None:
                    out = act(out)
                loss = self._local_loss(self._goodness(i, out), n)
                if self.local_loss_hook is not None:
                    loss = self.local_loss_hook(i, loss)
                for p, gr in zip(params, torch.autograd.grad(loss, params)):
                    accumulate_grad(p, gr)
            total += check_finite(loss.detach(), f"local loss of block {i}")
            h = out.detach()
        self.steps += 1
        return total / len(blocks)

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Goodness summed over the blocks, for every candidate label: scores ``(N, C)``."""
        blocks = blocks_of(model)
        x = inputs.flatten(1)
        classes = max(self.classes, int(getattr(model, "classes", 0)))
        if classes < 2:
            raise ValueError("model_free_ff cannot predict before it has been trained (or given classes=)")
        E = self._patterns(x.shape[1], classes, x.device, x.dtype)
        n = x.shape[0]
        # all labels in one batch: (C * N) candidates
        h = (x[None] + E[:, None]).reshape(classes * n, *inputs.shape[1:])
        score = torch.zeros(classes * n, device=x.device, dtype=x.dtype)
        for i, (prefix, layer, act) in enumerate(blocks):
            out = layer(self._run(prefix, h if i == 0 else self._normalise(h)))
            if act is not None:
                out = act(out)
            score += self._goodness(i, out)
            h = out
        return score.view(classes, n).t()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["classes"] = self.classes
        state["directions"] = [d.detach().cpu() for d in self.directions]
        if self.patterns is not None:
            state["patterns"] = self.patterns.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.classes = int(state.get("classes", 0))
        self.patterns = state["patterns"].clone() if "patterns" in state else None
        self.directions = [d.clone() for d in state.get("directions", [])]
