"""Two ordinary image models that are not flat ``nn.Sequential`` stacks, for testing rules beyond MLPs.

- :func:`rescnn`: conv stem ``Conv2d -> BatchNorm2d -> ReLU``, one residual :class:`~.resnet.BasicBlock`
  (He et al. 2016), global average pooling and a linear head;
- :func:`transformer`: each image row is a token, embedded by a ``Linear`` plus a learned position
  embedding, one ``nn.TransformerEncoderLayer`` (Vaswani et al. 2017), mean pooling over tokens and a
  linear head.

Both take images ``(N, C, H, W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .resnet import ResNet


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def rescnn(in_channels: int, classes: int, width: int = 16) -> ResNet:
    """Conv stem + BatchNorm2d + one residual block of ``width`` channels + average pool + linear head."""
    return ResNet(_positive(in_channels, "in_channels"), _positive(classes, "classes"),
                  widths=(_positive(width, "width"),), depth=(1,), batch_norm=True)


class PositionEmbedding(nn.Module):
    """``x + P``: a learned embedding ``P`` (``tokens x d_model``) per position, its own module so that
    layer-wise rules see its parameter as a layer's."""

    def __init__(self, tokens: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(tokens, d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight

    def local_weight_grads(self, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Gradient of ``sum(g * self(x))`` by formula: ``sum_n g[n]``."""
        return {"weight": g.sum(0)}


class RowTransformer(nn.Module):
    """Rows of an image as tokens: ``Linear(C*W -> d_model)`` + position embedding, ``layers`` encoder
    layers (post-norm, ReLU, no dropout), mean over tokens, ``Linear(d_model -> classes)``."""

    def __init__(self, in_channels: int, height: int, width: int, classes: int, d_model: int = 32, heads: int = 4,
                 ff: int = 64, layers: int = 1) -> None:
        super().__init__()
        for v, what in ((in_channels, "in_channels"), (height, "height"), (width, "width"), (classes, "classes"),
                        (d_model, "d_model"), (heads, "heads"), (ff, "ff"), (layers, "layers")):
            _positive(v, what)
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.embed = nn.Linear(in_channels * width, d_model)
        self.position = PositionEmbedding(height, d_model)
        self.encoder = nn.Sequential(*[
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True) for _ in range(layers)])
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.permute(0, 2, 1, 3).reshape(n, h, c * w)  # (N, rows, C*W)
        z = self.encoder(self.position(self.embed(tokens)))
        return self.head(z.mean(1))


def transformer(in_channels: int, height: int, width: int, classes: int, d_model: int = 32, heads: int = 4,
                ff: int = 64, layers: int = 1) -> RowTransformer:
    """A :class:`RowTransformer` for images ``(C, height, width)``."""
    return RowTransformer(in_channels, height, width, classes, d_model, heads, ff, layers)


__all__ = ["PositionEmbedding", "RowTransformer", "rescnn", "transformer"]
