"""Small inputs for any registered rule, whatever kind of data it takes (shared by the registry-wide tests)."""

from __future__ import annotations

from typing import Any

import torch

IMAGE = (1, 8, 8)
CLASSES = 10


def sample(name: str, n: int = 16, seed: int = 1) -> tuple[tuple[int, ...], int, Any, torch.Tensor]:
    """``(shape, classes, inputs, targets)`` for rule ``name``: a batch of 8x8 images, or a small graph."""
    from forwardlearn.rules import rule_class

    kind = rule_class(name).data_kind
    if kind == "graph":
        from forwardlearn.data.graphs import csbm

        graph = csbm(nodes=120, classes=4, features=8, avg_degree=6, homophily=0.8, feature_signal=1.0,
                     train_per_class=10, val_nodes=20, seed=seed)
        return (graph.num_features,), graph.num_classes, graph, graph.targets()
    if kind != "tensor":
        raise AssertionError(f"rule {name!r} takes {kind!r} data, which the registry-wide tests cannot build yet")
    g = torch.Generator().manual_seed(seed)
    return IMAGE, CLASSES, torch.rand(n, *IMAGE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
