"""Scalable Forward-Forward for convolutional and residual networks (Krutsylo 2025, arXiv:2501.03176).

The network is cut into *units* trained each by a loss of its own; the input of every unit is the
detached, layer-normalised output of the unit below, so no gradient crosses a unit boundary.

- Class goodness (the paper's new loss for convolutional layers): a small auxiliary convolution on the
  unit's output (``aux_kernel`` x ``aux_kernel``, one output channel per class) gives, in one forward
  pass, one goodness per class: the mean over positions of its squared activations. The true class's
  goodness is the positive, every other class's a negative; no negative inputs and no label pixels.
  Dense units (the fully connected layers of a CNN) use an auxiliary linear map the same way; the
  network's final classifier, already ``classes`` wide, is trained on its own output as the goodness.
- Loss: the log-sum-exp margin loss on the goodness vector ``g`` (``y`` the true class, ``m`` the margin)::

      L = log(1 + sum_{c != y} exp(g_c - g_y + m))  =  cross_entropy(g + m * (1 - onehot(y)), y)

  (with ``m = 0`` the plain cross-entropy of the goodness, i.e. the log-sum-exp over the class goodnesses
  against the true class's). The author's own summary (krutsylo.neocities.org/sff.html) confirms the
  per-class goodness (mean squared activation of one auxiliary channel per class, 1x1 or slightly larger
  kernel), the true class as the positive and every other class as a negative, layer-normalised and
  detached block outputs, and the averaged vote; it does not give the loss's formula. A summary of the
  paper (sciencestack.ai/paper/2501.03176) names the objective a "log-sum-exp margin loss", the form
  above. The paper's margin value could not be read: the default of 1 is this library's choice, and
  ``margin=0`` is the plain log-sum-exp.
- Units (``block_local``): ``False`` (pure FF): every convolution or linear layer with what follows
  it up to the next one (activation, pooling, batch norm) is a unit; in a residual block the first
  convolution is one unit and the second convolution together with the shortcut another.
  ``True`` (the paper's hybrid design): every residual block is one unit and backpropagation runs
  inside it (through both convolutions and the shortcut), never across blocks. For
  ``fl.models.cnn`` both settings give the same units (one convolution per stage).
- Prediction: the mean of the units' goodness vectors (``predict_from="all"``) or the last
  unit's (``"last"``), computed by the same pass.

Works on ``nn.Sequential`` models (``fl.models.cnn``, ``fl.models.mlp``) and on
:class:`forwardlearn.models.resnet.ResNet`. ``attach`` returns a :class:`SFFNetwork` that wraps the
network (``.net``, forward unchanged) with the auxiliary heads (``.sff_heads``), so an optimizer built
afterwards trains them. The rule remembers the wrapper of every network it attached: ``attach(net)``
again returns it, and ``predict(net, x)`` on the bare network uses its heads (so
``fl.train(net, rule, ...)`` followed by ``rule.predict(net, x)`` works).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.resnet import BasicBlock, ResNet
from .base import LossFn, Rule, accumulate_grad, check_finite, register

PARAMETRIC = (nn.Conv2d, nn.Linear)


@dataclass
class Unit:
    """A piece of the network trained by one local loss.

    ``run(x, ctx)`` maps the unit's (detached) input to its output; ``ctx`` carries the input of a
    residual block to the unit that adds the shortcut. ``modules`` own the unit's parameters;
    ``channels`` is the width the auxiliary head reads; ``conv`` whether the output is a feature map;
    ``is_classifier`` marks the network's final, ``classes``-wide linear layer (no auxiliary head).
    """

    run: Callable[[Tensor, dict[str, Tensor]], Tensor]
    modules: list[nn.Module]
    channels: int
    conv: bool
    is_classifier: bool = False
    opens_block: bool = False  # the unit starts a residual block: remember its input for the shortcut

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        out = []
        for m in self.modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


def _sequential_units(model: nn.Sequential) -> list[Unit]:
    groups: list[list[nn.Module]] = []
    prefix: list[nn.Module] = []
    for m in model:
        if isinstance(m, PARAMETRIC):
            groups.append([*prefix, m])
            prefix = []
        elif not groups or prefix or isinstance(m, nn.Flatten):
            prefix.append(m)  # a Flatten opens the next unit, so conv units keep their feature maps
        else:
            groups[-1].append(m)
    if not groups:
        raise ValueError("ff_conv found no Conv2d or Linear layer in the model")
    units = []
    for i, g in enumerate(groups):
        layer = next(m for m in g if isinstance(m, PARAMETRIC))
        seq = nn.Sequential(*g)
        conv = isinstance(layer, nn.Conv2d)
        channels = layer.out_channels if conv else layer.out_features
        last = i == len(groups) - 1
        units.append(Unit(lambda x, ctx, s=seq: s(x), g, channels, conv, is_classifier=last and not conv))
    return units


def _resnet_units(model: ResNet, block_local: bool) -> list[Unit]:
    stem = model.stem
    units = [Unit(lambda x, ctx: stem(x), [stem], stem[0].out_channels, True)]
    for block in model.blocks:
        assert isinstance(block, BasicBlock)
        if block_local:
            units.append(Unit(lambda x, ctx, b=block: b(x), [block], block.out_channels, True))
        else:
            units.append(Unit(lambda x, ctx, b=block: b.first_half(x), block.first_half_modules(),
                              block.out_channels, True, opens_block=True))
            units.append(Unit(lambda h, ctx, b=block: b.second_half(h, ctx["block_input"]),
                              block.second_half_modules(), block.out_channels, True))
    pool, head = model.pool, model.head
    units.append(Unit(lambda x, ctx: head(pool(x)), [pool, head], head.out_features, False, is_classifier=True))
    return units


def network_units(model: nn.Module, block_local: bool) -> list[Unit]:
    """The units of ``model`` (see the module docstring)."""
    if isinstance(model, ResNet):
        return _resnet_units(model, block_local)
    if isinstance(model, nn.Sequential):
        return _sequential_units(model)
    raise ValueError(f"ff_conv works on nn.Sequential models (fl.models.cnn / mlp) and fl.models.ResNet, "
                     f"got {type(model).__name__}")


def model_classes(model: nn.Module) -> int:
    """Number of classes: the width of the model's last linear layer."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("ff_conv needs a model that ends in a Linear classifier (it sets the number of classes)")
    return last[-1].out_features


def class_goodness(aux_out: Tensor) -> Tensor:
    """``(N, C)`` goodness per class: mean over positions of the squared auxiliary activations (``(N, C)`` input:
    the squares themselves)."""
    sq = aux_out.pow(2)
    return sq.flatten(2).mean(2) if sq.dim() > 2 else sq


def margin_loss(goodness: Tensor, targets: Tensor, margin: float) -> Tensor:
    """``mean log(1 + sum_{c != y} exp(g_c - g_y + margin))``: the log-sum-exp margin loss."""
    if margin:
        goodness = goodness + margin * (1.0 - F.one_hot(targets, goodness.shape[1]).to(goodness.dtype))
    return F.cross_entropy(goodness, targets)


def layer_normalize(h: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-example normalisation over every non-batch dimension (layer norm without learned scale)."""
    return F.layer_norm(h, h.shape[1:], eps=eps)


class SFFNetwork(nn.Module):
    """``attach``'s result: the network (``.net``, its forward unchanged) plus the auxiliary heads
    (``.sff_heads``, one per unit; ``Identity`` for the final classifier). ``forward`` is ``net``'s."""

    def __init__(self, net: nn.Module, heads: nn.ModuleList, config: tuple[bool, int]) -> None:
        super().__init__()
        self.net = net
        self.sff_heads = heads
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register
class ScalableForwardForward(Rule):
    """Scalable Forward-Forward (Krutsylo 2025) for CNNs and ResNets, with the block-local hybrid.

    Args:
        block_local: ``True``: backpropagation inside each residual block, never across blocks (the
            paper's hybrid); ``False``: every convolution / linear layer learns alone.
        margin: the margin ``m`` of the log-sum-exp loss (the default 1.0 is this library's choice).
        aux_kernel: kernel size (odd) of the auxiliary per-class convolutions.
        normalize: layer-normalise each unit's output before the next unit.
        predict_from: ``"all"`` (mean goodness of every unit) or ``"last"``.
        loss: unused (the losses are local); accepted for the common interface.
        seed: the rule's random stream (unused by the updates, which are deterministic).
    """

    name: ClassVar[str] = "ff_conv"
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = "Scalable Forward-Forward: per-class goodness of conv layers or ResNet blocks"
    paper: ClassVar[str] = "Krutsylo 2025, Scalable Forward-Forward Algorithm (arXiv:2501.03176)"
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 2e-3,
        "epochs": 12,
        "batch_size": 64,
        "hidden": [120, 84],
        "model": "cnn",
    }
    forward_only: ClassVar[bool] = False  # autograd runs inside each unit

    def __init__(
        self,
        block_local: bool = False,
        margin: float = 1.0,
        aux_kernel: int = 1,
        normalize: bool = True,
        predict_from: str = "all",
        loss: LossFn | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed)
        if not isinstance(block_local, bool):
            raise ValueError(f"block_local must be True or False, got {block_local!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0 <= margin < float("inf")):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        if isinstance(aux_kernel, bool) or not isinstance(aux_kernel, int) or aux_kernel < 1 or aux_kernel % 2 == 0:
            raise ValueError(f"aux_kernel must be a positive odd integer, got {aux_kernel!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if predict_from not in ("all", "last"):
            raise ValueError(f"predict_from must be 'all' or 'last', got {predict_from!r}")
        self.block_local = block_local
        self.margin = float(margin)
        self.aux_kernel = aux_kernel
        self.normalize = normalize
        self.predict_from = predict_from
        #: ``hook(unit_index, unit_loss) -> unit_loss`` applied to every local loss before its gradient
        self.local_loss_hook: Callable[[int, Tensor], Tensor] | None = None
        # the wrappers this rule made, by id of the bare network, so attach(net) and predict(net, x) find
        # the trained heads again
        self._wrappers: dict[int, SFFNetwork] = {}

    # --- structure -------------------------------------------------------------------------------
    def units(self, model: nn.Module) -> list[Unit]:
        """The units this rule trains ``model`` (a network or its :class:`SFFNetwork` wrapper) as."""
        return network_units(model.net if isinstance(model, SFFNetwork) else model, self.block_local)

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in a :class:`SFFNetwork` holding the auxiliary heads (idempotent)."""
        config = (self.block_local, self.aux_kernel)
        if isinstance(model, SFFNetwork):
            if model.config != config:
                raise ValueError(f"this model was attached with (block_local, aux_kernel) = {model.config}, "
                                 f"the rule has {config}; attach the underlying model (.net) afresh")
            return model
        known = self._wrappers.get(id(model))
        if known is not None and known.net is model:
            return known
        units = self.units(model)
        classes = model_classes(model)
        heads = nn.ModuleList()
        for u in units:
            if u.is_classifier:
                heads.append(nn.Identity())
            elif u.conv:
                heads.append(nn.Conv2d(u.channels, classes, self.aux_kernel, padding=self.aux_kernel // 2))
            else:
                heads.append(nn.Linear(u.channels, classes))
        ref = next((p for p in model.parameters()), None)
        if ref is not None:
            heads.to(device=ref.device, dtype=ref.dtype)
        wrapper = SFFNetwork(model, heads, config)
        self._wrappers[id(model)] = wrapper
        return wrapper

    def _network(self, model: nn.Module) -> SFFNetwork:
        if isinstance(model, SFFNetwork):
            return model
        known = self._wrappers.get(id(model))
        if known is not None and known.net is model:
            return known  # the bare network this rule attached (e.g. after fl.train(net, rule, ...))
        raise ValueError("ff_conv: call model = rule.attach(model) first (and build the optimizer after attach)")

    def _prepare(self, h: Tensor) -> Tensor:
        return layer_normalize(h) if self.normalize else h

    def _pass(self, model: nn.Module, inputs: Tensor, targets: Tensor | None) -> tuple[list[Tensor], float]:
        """Run every unit on the detached, normalised output of the one below; with ``targets``, add each
        unit's local gradient to ``.grad``. Returns the goodness of each unit and the summed loss."""
        net = self._network(model)
        units = self.units(net)
        heads = net.sff_heads
        ctx: dict[str, Tensor] = {}
        h = inputs
        scores: list[Tensor] = []
        losses: list[Tensor] = []
        params: list[nn.Parameter] = []
        train = targets is not None and torch.is_grad_enabled()
        for k, (unit, head) in enumerate(zip(units, heads)):
            x = h.detach() if k == 0 else self._prepare(h.detach())
            if unit.opens_block:
                ctx["block_input"] = x
            out = unit.run(x, ctx)
            g = out if unit.is_classifier else class_goodness(head(out))
            if train:
                assert targets is not None
                lk = margin_loss(g, targets, self.margin)
                if self.local_loss_hook is not None:
                    lk = self.local_loss_hook(k, lk)
                losses.append(lk)
                params += unit.parameters() + [p for p in head.parameters() if p.requires_grad]
            scores.append(g.detach())
            h = out
        total = 0.0
        if losses:
            # every unit's input is detached, so one reverse pass over the sum gives each unit exactly the
            # gradient of its own loss (no term of one unit's loss reaches another unit's parameters)
            summed = torch.stack(losses).sum()
            for p, grad in zip(params, torch.autograd.grad(summed, params, allow_unused=True)):
                if grad is not None:
                    accumulate_grad(p, grad)
            total = float(summed.detach())
        return scores, total

    # --- the contract ----------------------------------------------------------------------------
    def grads(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        _, total = self._pass(model, inputs, targets)
        self.steps += 1
        return check_finite(total, "loss")

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        scores, _ = self._pass(model, inputs, None)
        if self.predict_from == "last":
            return scores[-1]
        return torch.stack(scores).mean(0)


__all__ = ["SFFNetwork", "ScalableForwardForward", "Unit", "class_goodness", "layer_normalize", "margin_loss",
           "network_units"]
