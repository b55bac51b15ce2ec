"""Residual networks (He et al. 2016, "Deep Residual Learning for Image Recognition", §3-4, CIFAR variant).

``ResNet`` = stem ``conv3x3 -> BN -> ReLU``, then stages of :class:`BasicBlock` (the first block of
every stage after the first halves the resolution), global average pooling and a linear head.
``resnet18`` is the CIFAR ResNet-18 (widths 64-512, two blocks per stage); :func:`resnet` builds
smaller ones for small inputs and CPUs. Blocks expose their two halves so that layer-wise rules can
train each convolution on its own (see ``forwardlearn.rules.forward_forward_conv``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """``relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))`` (He et al. 2016, Fig. 2).

    The shortcut is the identity, or ``conv1x1 -> BN`` when the stride or the width changes (option B).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = _norm(out_channels, batch_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm(out_channels, batch_norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=not batch_norm),
                                          _norm(out_channels, batch_norm))
        self.relu = nn.ReLU()

    def first_half(self, x: Tensor) -> Tensor:
        """``relu(BN(conv1(x)))``."""
        return self.relu(self.bn1(self.conv1(x)))

    def second_half(self, h: Tensor, x: Tensor) -> Tensor:
        """``relu(BN(conv2(h)) + shortcut(x))`` with ``x`` the block's input."""
        return self.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    def first_half_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]

    def second_half_modules(self) -> list[nn.Module]:
        return [self.conv2, self.bn2, self.shortcut]

    def forward(self, x: Tensor) -> Tensor:
        return self.second_half(self.first_half(x), x)


class ResNet(nn.Module):
    """``stem -> blocks -> global average pool -> head``; see :func:`resnet`."""

    def __init__(self, in_channels: int, classes: int, widths: Sequence[int] = (16, 32, 64),
                 depth: Sequence[int] = (1, 1, 1), batch_norm: bool = True) -> None:
        super().__init__()
        for v, what in ((in_channels, "in_channels"), (classes, "classes")):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        if not widths or len(widths) != len(depth):
            raise ValueError(f"widths and depth need the same non-zero length, got {list(widths)} and {list(depth)}")
        for v in (*widths, *depth):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"widths and depth must be positive integers, got {list(widths)}, {list(depth)}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=not batch_norm),
                                  _norm(widths[0], batch_norm), nn.ReLU())
        blocks: list[BasicBlock] = []
        c = widths[0]
        for stage, (w, d) in enumerate(zip(widths, depth)):
            for i in range(d):
                blocks.append(BasicBlock(c, w, stride=2 if (stage > 0 and i == 0) else 1, batch_norm=batch_norm))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


def resnet(in_channels: int, widths: Sequence[int] = (16, 32, 64), classes: int = 10, *,
           depth: Sequence[int] = (1, 1, 1), batch_norm: bool = True) -> ResNet:
    """A CIFAR-style ResNet: ``len(widths)`` stages of ``depth[i]`` basic blocks of width ``widths[i]``.

    The arguments run as in :func:`~forwardlearn.models.basic.mlp`: inputs, widths, classes."""
    if isinstance(widths, int):
        raise ValueError(f"resnet(in_channels, widths, classes, ...) takes the stage widths second, got {widths!r}; "
                         f"pass classes={widths} by keyword or as the third argument")
    return ResNet(in_channels, classes, widths, depth, batch_norm)


def resnet18(in_channels: int = 3, classes: int = 10) -> ResNet:
    """CIFAR ResNet-18: widths (64, 128, 256, 512), two basic blocks per stage."""
    return ResNet(in_channels, classes, (64, 128, 256, 512), (2, 2, 2, 2))


__all__ = ["BasicBlock", "ResNet", "resnet", "resnet18"]
