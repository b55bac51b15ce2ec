"""Forward gradient with local-loss guesses (Fournier et al. 2023): ``local_forward_gradient``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import BlockSpec, check_block_spec, cut_forward, select_blocks
from ..forward_only.forward_mode import jvp_loss
from ..forward_only.local import give_grad
from ..models.resnet import BasicBlock
from .base import LossFn, Rule, accumulate_grad, check_finite, register, trainable_parameters


class ChannelPool(nn.Module):
    """Global average pool per channel of a conv block's output, also after the block flattened it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, h: Tensor) -> Tensor:
        # Flatten keeps channel-major order, so (N, C*H*W) -> (N, C, H*W) undoes it
        return h.reshape(h.shape[0], self.channels, -1).mean(-1)


class PooledHead(nn.Module):
    """An auxiliary classifier on any block input: images ``(N, C, H, W)`` and token sequences ``(N, T, E)``
    are averaged over space / tokens, a flattened conv output ``(N, C*H*W)`` over its positions, then a
    ``Linear(features, classes)``."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.features = features
        self.linear = nn.Linear(features, classes)

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() == 4:
            h = h.mean((2, 3))
        elif h.dim() == 3:
            h = h.mean(1)
        elif h.dim() == 2 and h.shape[1] != self.features:
            h = h.reshape(h.shape[0], self.features, -1).mean(-1)
        return self.linear(h)


def block_features(m: nn.Module) -> int | None:
    """The feature width of what enters block ``m`` (channels, ``d_model``, ``in_features``), if known."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, (nn.Conv2d, BasicBlock)):
        return m.in_channels
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return m.self_attn.embed_dim
    config = getattr(m, "config", None)  # Hugging Face layers
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    for c in m.modules():  # any other block: the width its first layer takes
        if isinstance(c, nn.MultiheadAttention):
            return c.embed_dim
        if c is not m and isinstance(c, (nn.Linear, nn.Conv2d)):
            return block_features(c)
    return None


class LocalHeads(nn.Module):
    """``net`` plus one auxiliary classifier per hidden block; ``forward`` is ``net``'s."""

    def __init__(self, net: nn.Module, heads: nn.ModuleList) -> None:
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

    An ``nn.Sequential`` is cut into blocks, one per layer with parameters plus the parameter-free layers
    after it. Any other model is cut at the input of every chosen block (``blocks=``, see
    :func:`forwardlearn.blocks.select_blocks`; default every residual block and transformer layer, else every
    ``Linear``/``Conv2d``): the segment from one block's input to the next one's is a block.
    ``attach`` wraps the model as :class:`LocalHeads` with one auxiliary linear classifier per hidden block
    (on the averaged channels or tokens for conv and transformer blocks, :class:`PooledHead`).

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
    backward: ClassVar[str] = "local"
    description: ClassVar[str] = "forward gradient along the gradient of a per-block auxiliary loss"
    paper: ClassVar[str] = ("Fournier, Rivaud, Belilovsky, Eickenberg & Oyallon 2023, "
                            "Can Forward Gradient Match Backpropagation?")
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 2e-3, "epochs": 8, "batch_size": 64, "hidden": [128], "model": "mlp",
    }
    forward_only: ClassVar[bool] = False

    def __init__(self, projection: str = "global", blocks: BlockSpec = None, loss: LossFn | None = None,
                 seed: int | None = None) -> None:
        super().__init__(loss=loss, seed=seed)
        if projection not in ("global", "block"):
            raise ValueError(f"projection must be 'global' or 'block', got {projection!r}")
        self.projection = projection
        self.blocks = check_block_spec(blocks)

    def _hooked(self, model: nn.Module) -> bool:
        """Cut at chosen blocks (any model, or a ``Sequential`` with ``blocks=`` given) rather than layer by layer."""
        return not isinstance(model, nn.Sequential) or self.blocks is not None

    @staticmethod
    def _first_head(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> int:
        """0 when trained layers run before the first chosen block (embeddings, say: its input then gets a
        head too), else 1 (the first block reads the data)."""
        inside = {id(c) for _, b in chosen for c in b.modules()}
        for name, m in model.named_modules():
            if name == chosen[0][0]:
                return 1
            if m is not model and id(m) not in inside and any(p.requires_grad for p in m.parameters(recurse=False)):
                return 0
        return 1

    def _attach_hooked(self, model: nn.Module) -> LocalHeads:
        chosen = select_blocks(model, self.blocks, self.name)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{self.name}: the model has no Linear layer to read the number of classes from")
        classes = linears[-1].out_features
        heads = nn.ModuleList()
        for name, m in chosen[self._first_head(model, chosen):]:
            width = block_features(m)
            if width is None:
                raise ValueError(f"{self.name}: no auxiliary head for the input of block {name!r} "
                                 f"({type(m).__name__}); choose blocks= among Linear, Conv2d, residual or "
                                 "transformer layers")
            heads.append(PooledHead(width, classes))
        p = next(model.parameters())
        heads.to(device=p.device, dtype=p.dtype)
        return LocalHeads(model, heads)

    def attach(self, model: nn.Module) -> nn.Module:
        if isinstance(model, LocalHeads):
            return model
        if self._hooked(model):
            return self._attach_hooked(model)
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
        if self._hooked(model.net):
            guess, block_of, loss = self._guesses_hooked(model, inputs, targets)
        else:
            guess, block_of, loss = self._guesses_sequential(model, inputs, targets)
        self._project(model.net, inputs, targets, guess, block_of)
        self.steps += 1
        return loss

    def _guesses_hooked(self, model: LocalHeads, inputs: Tensor, targets: Tensor
                        ) -> tuple[dict[int, Tensor], list[list[int]], float]:
        """One forward pass cut at the chosen blocks' inputs; each segment's local loss differentiated alone."""
        chosen = select_blocks(model.net, self.blocks, self.name)
        net_params = trainable_parameters(model.net)
        y, cuts = cut_forward(model.net, inputs, chosen)
        first = self._first_head(model.net, chosen)
        locals_: list[tuple[Tensor, list[nn.Parameter]]] = []
        for j, h in cuts:
            if j < first:
                raise ValueError(f"{self.name}: trained parameters run before the first chosen block "
                                 f"{chosen[0][0]!r} but come after it in the model; choose blocks= that include them")
            head = model.heads[j - first]
            locals_.append((self.loss(head(h), targets), trainable_parameters(head)))
        final = self.loss(y, targets)
        loss = check_finite(final.detach(), "loss")
        locals_.append((final, []))
        guess: dict[int, Tensor] = {}
        block_of: list[list[int]] = []
        for local, hparams in locals_:  # the graphs are cut: each reaches its own segment and head only
            gs = torch.autograd.grad(local, net_params + hparams, allow_unused=True)
            for p, g in zip(hparams, gs[len(net_params):]):
                if g is not None:
                    accumulate_grad(p, g)
            ids = [i for i, g in enumerate(gs[: len(net_params)]) if g is not None and i not in guess]
            for i in ids:
                guess[i] = gs[i].detach()
            block_of.append(ids)
        for i, p in enumerate(net_params):
            if i not in guess:
                guess[i] = torch.zeros_like(p)
        return guess, block_of, loss

    def _guesses_sequential(self, model: LocalHeads, inputs: Tensor, targets: Tensor
                            ) -> tuple[dict[int, Tensor], list[list[int]], float]:
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
        return guess, block_of, loss

    def _project(self, net: nn.Module, inputs: Tensor, targets: Tensor, guess: dict[int, Tensor],
                 block_of: list[list[int]]) -> None:
        """``g = (grad L . G / |G|^2) G`` by forward mode, over all blocks or block by block."""
        net_params = trainable_parameters(net)
        if self.projection == "global":
            _, d = jvp_loss(net, inputs, targets, self.loss, lambda i, p: guess[i])
            norm2 = sum(float(g.double().pow(2).sum()) for g in guess.values())
            groups = [(list(guess), d, norm2)]
        else:
            groups = []
            for ids in block_of:
                chosen = set(ids)
                _, d = jvp_loss(net, inputs, targets, self.loss,
                                lambda i, p, chosen=chosen: guess[i] if i in chosen else None)
                groups.append((ids, d, sum(float(guess[i].double().pow(2).sum()) for i in ids)))
        for ids, d, norm2 in groups:
            scale = d / norm2 if norm2 > 0 else 0.0
            for i in ids:
                give_grad(net_params[i], guess.pop(i).mul_(scale))
